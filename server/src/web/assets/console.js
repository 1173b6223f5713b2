// The live console: a stream of SPEC 3.9 over server-sent events (EventSource). The browser
// reconnects by itself and sends Last-Event-ID, so the server replays what was missed (or says
// stream_reset). Frames go to a table with filters by id and direction and to a frames-per-second
// chart drawn on a canvas; other events to a list.
(function () {
  'use strict';
  var B = window.Bridge;
  if (!B) { return; }

  var MAX_KEPT = 2000;   // frames kept in memory for the filters
  var MAX_ROWS = 300;    // rows in the table
  var MAX_EVENTS = 100;  // entries in the events list
  var SECONDS = 60;      // the chart's window

  function hex(n, extended) {
    var s = n.toString(16).toUpperCase();
    var width = extended ? 8 : 3;
    while (s.length < width) { s = '0' + s; }
    return s;
  }

  function spaced(dataHex) {
    return (dataHex || '').toUpperCase().replace(/(..)(?=.)/g, '$1 ');
  }

  function clock(at) {
    var d = new Date(at);
    var ms = String(d.getMilliseconds()).padStart(3, '0');
    return d.toLocaleTimeString([], { hour12: false }) + '.' + ms;
  }

  function Console(root) {
    this.root = root;
    this.url = root.getAttribute('data-console');
    this.status = root.querySelector('[data-console-status]');
    this.sampling = root.querySelector('[data-sampling]');
    this.tbody = root.querySelector('[data-frames]');
    this.events = root.querySelector('[data-events]');
    this.canvas = root.querySelector('[data-fps-chart]');
    this.fpsText = root.querySelector('[data-fps]');
    this.busLoad = root.querySelector('[data-bus-load]');
    this.totalText = root.querySelector('[data-frames-total]');
    this.kept = [];
    this.pending = [];
    this.total = 0;
    this.paused = false;
    this.lastId = null;
    this.lastSampledAt = 0;
    this.buckets = [];           // frames per second, newest last
    this.current = 0;            // frames in the second under way
    this.filter = { ids: null, dir: '' };
    this.retry = 1000;
    this.bindControls();
    this.open();
    var self = this;
    setInterval(function () { self.second(); }, 1000);
    window.addEventListener('resize', function () { self.draw(); });
    this.draw();
  }

  Console.prototype.setStatus = function (text, state) {
    this.status.textContent = text;
    this.status.className = 'console-status ' + (state || '');
  };

  Console.prototype.open = function () {
    var self = this;
    this.setStatus('Connecting\u2026');
    var es = new EventSource(this.url);
    this.es = es;
    es.onopen = function () {
      self.retry = 1000;
      self.setStatus('Live' + (self.lastId ? ' (resumed after event ' + self.lastId + ')' : ''), 'live');
    };
    es.onerror = function () {
      if (es.readyState === EventSource.CONNECTING) {
        // The browser reconnects by itself, sending Last-Event-ID.
        self.setStatus('Reconnecting\u2026 the console resumes where it stopped.', 'down');
        return;
      }
      // Closed for good (an error answer): find out why, then open a new stream.
      es.close();
      self.setStatus('Disconnected. Trying again\u2026', 'down');
      B.api('GET', '/auth/me').then(function () {
        setTimeout(function () {
          self.note('log', 'The stream was reopened: events while it was closed may be missing.');
          self.open();
        }, self.retry);
        self.retry = Math.min(self.retry * 2, 30000);
      }, function (e) {
        if (e instanceof B.ApiError && e.signedOut()) { B.signedOut(); return; }
        setTimeout(function () { self.open(); }, self.retry);
        self.retry = Math.min(self.retry * 2, 30000);
      });
    };
    ['presence', 'can_frame', 'log', 'command_status', 'cli_telemetry', 'host_output', 'bus_load', 'group_state', 'stream_reset', 'access_ended'].forEach(function (type) {
      es.addEventListener(type, function (ev) { self.receive(type, ev); });
    });
  };

  Console.prototype.receive = function (type, ev) {
    if (ev.lastEventId) { this.lastId = ev.lastEventId; this.root.setAttribute('data-last-event-id', ev.lastEventId); }
    var data;
    try { data = JSON.parse(ev.data); } catch (e) { return; }
    this.root.dispatchEvent(new CustomEvent('console-event', { bubbles: true, detail: { type: type, data: data } }));
    switch (type) {
      case 'can_frame': this.frame(data); break;
      case 'presence':
        this.note(type, 'Dongle ' + this.dongleName(data.dongle_id) + ' is ' + (data.online ? 'online' : 'offline') + '.');
        break;
      case 'log':
        this.note(type, data.message);
        if (/every frame again/.test(data.message || '')) { this.sampling.hidden = true; }
        break;
      case 'command_status':
        this.note(type, 'Command ' + data.command_id.slice(0, 8) + ' is ' + data.status +
          (data.exit_code === undefined || data.exit_code === null ? '' : ' (exit code ' + data.exit_code + ')') + '.');
        break;
      case 'host_output':
        this.note(type, 'Workstation: ' + (data.chunk || '').replace(/\n$/, ''));
        break;
      case 'bus_load':
        // The server's figure for the whole bus (the frames above may be a sample of it).
        if (this.busLoad) {
          this.busLoad.hidden = false;
          this.busLoad.textContent = 'Bus: ' + data.frames_per_sec + ' frames/s' +
            (data.load_percent === undefined ? ' (apply a CAN configuration to see the load in %)'
              : ', about ' + data.load_percent + ' % of ' + (data.bitrate / 1000) + ' kbit/s');
        }
        break;
      case 'cli_telemetry':
        this.note(type, (data.source === 'uart' ? 'Typed on the dongle\u2019s console: '
          : data.source === 'host' ? 'Ran on the workstation: ' : 'Command: ') +
          data.command + ' \u2192 exit code ' + data.exit_code + (data.error ? ' (failed)' : '') +
          (data.output ? ': ' + data.output.trim() : '') + (data.truncated ? ' (output cut)' : ''));
        break;
      case 'group_state':
        this.note(type, 'Group: ' + describeGroup(data.detail));
        break;
      case 'stream_reset':
        this.note(type, 'Some events were missed: ' + (data.reason || 'the stream was reset') + '.');
        break;
      case 'access_ended':
        // The server ended the stream for good: reconnecting would only be refused.
        if (this.es) { this.es.close(); }
        this.setStatus('Ended: ' + (data.reason || 'access ended') + '. Reload the page to look again.', 'down');
        this.note(type, 'The console ended: ' + (data.reason || 'access ended') + '.');
        break;
    }
  };

  function describeGroup(detail) {
    if (!detail || typeof detail !== 'object') { return String(detail); }
    var parts = [];
    var state = detail.state || detail.mode;
    if (state) { parts.push(state); }
    if (detail.offline_side) {
      parts.push(detail.offline_side === 'both' ? 'both sides offline' : 'side ' + detail.offline_side.toUpperCase() + ' offline');
    }
    if (detail.backlog && typeof detail.backlog === 'object') {
      parts.push('backlog A\u2192B ' + (detail.backlog.a_to_b || 0) + ', B\u2192A ' + (detail.backlog.b_to_a || 0));
    }
    return parts.length ? parts.join(', ') : JSON.stringify(detail);
  }

  Console.prototype.dongleName = function (id) {
    var row = document.querySelector('tr[data-side][data-dongle-id="' + id + '"]');
    if (row) { return row.getAttribute('data-side').toUpperCase(); }
    return id ? id.slice(0, 8) : '?';
  };

  Console.prototype.frame = function (f) {
    var weight = f.sampled && f.sampled > 1 ? f.sampled : 1;
    this.current += weight;
    this.total += 1;
    if (weight > 1) {
      this.lastSampledAt = Date.now();
      this.sampling.hidden = false;
      this.sampling.textContent = 'Sampling is on: the console shows 1 frame in ' + f.sampled +
        ' (the data plane carries every frame; the chart counts them all).';
    }
    // The server's time of the frame (v0.7's `ts`), else the time it arrived here.
    var ts = f.ts ? Date.parse(f.ts) : NaN;
    f.at = isNaN(ts) ? Date.now() : ts;
    this.kept.push(f);
    if (this.kept.length > MAX_KEPT) { this.kept.splice(0, this.kept.length - MAX_KEPT); }
    if (!this.paused && this.matches(f)) {
      this.pending.push(f);
      this.schedule();
    }
  };

  Console.prototype.matches = function (f) {
    if (this.filter.dir && f.direction !== this.filter.dir) { return false; }
    if (this.filter.ids && this.filter.ids.indexOf(f.can_id) < 0) { return false; }
    return true;
  };

  Console.prototype.row = function (f) {
    var tr = document.createElement('tr');
    tr.setAttribute('data-direction', f.direction);
    tr.setAttribute('data-can-id', hex(f.can_id, f.is_extended));
    var cells = [clock(f.at), this.dongleName(f.dongle_id), f.direction, hex(f.can_id, f.is_extended) + (f.is_extended ? ' (ext)' : '') + (f.fd ? ' FD' : ''), spaced(f.data_hex)];
    cells.forEach(function (text, i) {
      var td = document.createElement('td');
      td.textContent = text;
      if (i === 4) { td.className = 'data'; }
      tr.appendChild(td);
    });
    return tr;
  };

  // Rows are added once per animation frame, however fast frames come.
  Console.prototype.schedule = function () {
    if (this.scheduled) { return; }
    this.scheduled = true;
    var self = this;
    requestAnimationFrame(function () {
      self.scheduled = false;
      var batch = self.pending.splice(0, self.pending.length).slice(-MAX_ROWS);
      var fragment = document.createDocumentFragment();
      for (var i = batch.length - 1; i >= 0; i--) { fragment.appendChild(self.row(batch[i])); }
      self.tbody.insertBefore(fragment, self.tbody.firstChild);
      while (self.tbody.rows.length > MAX_ROWS) { self.tbody.deleteRow(-1); }
      self.totalText.textContent = String(self.total);
    });
  };

  Console.prototype.rerender = function () {
    var self = this;
    this.tbody.textContent = '';
    this.pending = this.kept.filter(function (f) { return self.matches(f); });
    this.schedule();
  };

  Console.prototype.note = function (type, text) {
    var li = document.createElement('li');
    li.setAttribute('data-event', type);
    li.textContent = new Date().toLocaleTimeString([], { hour12: false }) + ' ' + text;
    this.events.insertBefore(li, this.events.firstChild);
    while (this.events.children.length > MAX_EVENTS) { this.events.removeChild(this.events.lastChild); }
  };

  Console.prototype.bindControls = function () {
    var self = this;
    var form = this.root.querySelector('[data-console-filters]');
    var idInput = form.querySelector('[name="filter-id"]');
    var dirInput = form.querySelector('[name="filter-dir"]');
    function apply() {
      var ids = idInput.value.split(/[\s,]+/).filter(Boolean).map(function (s) {
        return parseInt(s.replace(/^0x/i, ''), 16);
      }).filter(function (n) { return !isNaN(n); });
      self.filter = { ids: ids.length ? ids : null, dir: dirInput.value };
      self.rerender();
    }
    idInput.addEventListener('input', apply);
    dirInput.addEventListener('change', apply);
    form.addEventListener('submit', function (ev) { ev.preventDefault(); apply(); });
    var pause = form.querySelector('[data-console-pause]');
    pause.addEventListener('click', function () {
      self.paused = !self.paused;
      pause.setAttribute('aria-pressed', String(self.paused));
      pause.textContent = self.paused ? 'Resume' : 'Pause';
      if (!self.paused) { self.rerender(); }
    });
    form.querySelector('[data-console-clear]').addEventListener('click', function () {
      self.kept = [];
      self.pending = [];
      self.tbody.textContent = '';
    });
  };

  // Once a second: close the bucket, hide a stale sampling notice, redraw.
  Console.prototype.second = function () {
    this.buckets.push(this.current);
    this.current = 0;
    if (this.buckets.length > SECONDS) { this.buckets.shift(); }
    this.fpsText.textContent = String(this.buckets[this.buckets.length - 1] || 0);
    this.root.setAttribute('data-fps-now', this.fpsText.textContent);
    if (this.lastSampledAt && Date.now() - this.lastSampledAt > 3000) { this.sampling.hidden = true; }
    this.draw();
  };

  Console.prototype.draw = function () {
    drawChart(this.canvas, [{ values: this.buckets, color: '#1d4f91', label: 'frames/s' }], SECONDS, 's');
  };

  // A line chart of a few series over a fixed number of samples, newest at the right.
  function drawChart(canvas, series, span, unit) {
    if (!canvas) { return; }
    var ratio = window.devicePixelRatio || 1;
    var width = canvas.clientWidth || 600;
    var height = canvas.clientHeight || 140;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    var ctx = canvas.getContext('2d');
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    var left = 48, right = 8, top = 10, bottom = 22;
    var w = width - left - right, h = height - top - bottom;
    var max = 4;
    series.forEach(function (s) { s.values.forEach(function (v) { if (v > max) { max = v; } }); });
    max = niceCeil(max);
    ctx.font = '11px system-ui, sans-serif';
    ctx.fillStyle = '#57606a';
    ctx.strokeStyle = '#d0d7de';
    ctx.lineWidth = 1;
    for (var i = 0; i <= 4; i++) {
      var y = top + h - (h * i / 4);
      ctx.beginPath(); ctx.moveTo(left, y + 0.5); ctx.lineTo(left + w, y + 0.5); ctx.stroke();
      ctx.textAlign = 'right'; ctx.textBaseline = 'middle';
      ctx.fillText(formatNumber(max * i / 4), left - 6, y);
    }
    ctx.textAlign = 'left'; ctx.textBaseline = 'top';
    ctx.fillText('-' + span + ' ' + unit, left, top + h + 6);
    ctx.textAlign = 'right';
    ctx.fillText('now', left + w, top + h + 6);
    series.forEach(function (s, n) {
      var values = s.values;
      if (!values.length) { return; }
      ctx.strokeStyle = s.color;
      ctx.lineWidth = 2;
      ctx.beginPath();
      for (var k = 0; k < values.length; k++) {
        var x = left + w - (values.length - 1 - k) * (w / Math.max(1, span - 1));
        var yv = top + h - (values[k] / max) * h;
        if (k === 0) { ctx.moveTo(x, yv); } else { ctx.lineTo(x, yv); }
      }
      ctx.stroke();
      if (series.length > 1) {
        ctx.fillStyle = s.color;
        ctx.textAlign = 'left'; ctx.textBaseline = 'top';
        ctx.fillText(s.label, left + 8 + n * 110, top + 2);
      }
    });
  }

  function niceCeil(v) {
    var p = Math.pow(10, Math.floor(Math.log10(v)));
    var steps = [1, 2, 2.5, 5, 10];
    for (var i = 0; i < steps.length; i++) { if (steps[i] * p >= v) { return steps[i] * p; } }
    return 10 * p;
  }

  function formatNumber(v) {
    if (v >= 1000000) { return (v / 1000000).toFixed(1) + 'M'; }
    if (v >= 10000) { return Math.round(v / 1000) + 'k'; }
    return String(Math.round(v * 10) / 10);
  }

  window.BridgeCharts = { draw: drawChart };
  document.querySelectorAll('[data-console]').forEach(function (root) { root.bridgeConsole = new Console(root); });
})();

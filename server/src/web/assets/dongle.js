// A dongle's page: pairing with the 120 s countdown, the CAN timing preview, command output as it
// comes, presence.
(function () {
  'use strict';
  var B = window.Bridge;
  var summary = document.querySelector('[data-dongle]');
  if (!B || !summary) { return; }
  var dongleId = summary.getAttribute('data-dongle');

  // ---- Pairing ---------------------------------------------------------------------------------
  var countdownTimer = null;

  function startCountdown(expiresAt, skewMs) {
    var el = document.getElementById('pairing-countdown');
    var windowEl = document.getElementById('pairing-window');
    if (!el || !windowEl) { return; }
    var end = new Date(expiresAt).getTime();
    if (isNaN(end)) { return; }
    windowEl.hidden = false;
    var pin = document.getElementById('pairing-pin');
    var submit = document.querySelector('#pairing-submit button[type="submit"]');
    var announced = {};
    clearInterval(countdownTimer);
    function tick() {
      var left = Math.max(0, Math.round((end - (Date.now() + skewMs)) / 1000));
      if (left <= 0) {
        clearInterval(countdownTimer);
        el.textContent = 'The pairing window has closed: start pairing again for a new PIN.';
        el.setAttribute('aria-live', 'polite');
        if (submit) { submit.disabled = true; }
        return;
      }
      var m = Math.floor(left / 60);
      var s = left % 60;
      el.textContent = 'Pairing window open: ' + m + ':' + (s < 10 ? '0' : '') + s + ' left to type the PIN.';
      el.setAttribute('data-seconds-left', String(left));
      // Screen readers hear the time at a few moments, not every second.
      [60, 30, 10].forEach(function (mark) {
        if (left <= mark && !announced[mark]) {
          announced[mark] = true;
          B.announce(left + ' seconds left to type the PIN.');
        }
      });
      if (submit) { submit.disabled = false; }
    }
    tick();
    countdownTimer = setInterval(tick, 250);
    if (pin) { pin.focus(); }
  }

  function serverSkew(res) {
    var date = res && res.headers && res.headers.get('Date');
    var at = date ? new Date(date).getTime() : NaN;
    // The Date header has whole seconds: only a larger difference is a skew worth correcting.
    if (isNaN(at) || Math.abs(at - Date.now()) < 2000) { return 0; }
    return at - Date.now();
  }

  B.onOk['pairing-started'] = function (form, data, res) {
    if (data.paired) { location.assign('/dongles/' + dongleId + '?notice=paired'); return; }
    var hidden = document.querySelector('#pairing-submit input[name="pairing_session_id"]');
    if (hidden) { hidden.value = data.pairing_session_id || ''; }
    var pin = document.getElementById('pairing-pin');
    if (pin) { pin.value = ''; }
    B.showError(document.getElementById('pairing-submit'), '');
    B.showStatus(form, 'Pairing mode is on: type the PIN the dongle shows.');
    startCountdown(data.expires_at, serverSkew(res));
  };

  B.onOk.paired = function (form) {
    clearInterval(countdownTimer);
    B.showStatus(form, 'Paired.');
    location.assign('/dongles/' + dongleId + '?notice=paired');
  };

  B.onError.paired = function (form, e) {
    var pin = document.getElementById('pairing-pin');
    if (e.code === 'PAIRING_PIN_INVALID' && pin) { pin.select(); pin.focus(); }
    if (e.code === 'PAIRING_EXPIRED' || e.code === 'PAIRING_SECURITY_HOLD') {
      clearInterval(countdownTimer);
      var el = document.getElementById('pairing-countdown');
      if (el) {
        el.textContent = e.code === 'PAIRING_EXPIRED'
          ? 'The pairing window has closed: start pairing again for a new PIN.'
          : 'The dongle is on security hold: only an administrator can clear it (force-unpair).';
      }
    }
  };

  var expiresEl = document.getElementById('pairing-countdown');
  if (expiresEl && expiresEl.getAttribute('data-expires')) {
    startCountdown(expiresEl.getAttribute('data-expires'), 0);
  }

  // ---- CAN timing preview (80 MHz CAN clock, as the dongle and its simulator) ------------------
  var CLOCK = 80000000;

  function split(quanta, sp, l) {
    var ideal = Math.max(0, Math.floor((quanta * sp + 500) / 1000) - 1);
    var low = Math.max(1, quanta - 1 - l.tseg2);
    var high = Math.min(quanta - 2, l.tseg1);
    if (low > high) { return null; }
    var tseg1 = Math.min(high, Math.max(low, ideal));
    return [tseg1, quanta - 1 - tseg1];
  }

  // The dongle's own derivation: smallest bitrate error, then closest sample point, then most quanta.
  function derive(bitrate, sp, l) {
    var best = null;
    var maxQuanta = 1 + l.tseg1 + l.tseg2;
    for (var p = 1; p <= l.prescaler; p++) {
      var ideal = Math.floor(CLOCK / (p * bitrate));
      for (var k = 0; k < 2; k++) {
        var q = ideal + k;
        if (q < 3 || q > maxQuanta) { continue; }
        var actual = Math.floor(CLOCK / (p * q));
        var ppm = Math.floor(Math.abs(actual - bitrate) * 1000000 / bitrate);
        if (ppm > 10000) { continue; }
        var s = split(q, sp, l);
        if (!s) { continue; }
        var achieved = Math.floor((1 + s[0]) * 1000 / q);
        var key = [ppm, Math.abs(achieved - sp), -q];
        if (!best || less(key, best.key)) { best = { key: key, prescaler: p, tseg1: s[0], tseg2: s[1] }; }
      }
    }
    return best;
  }
  function less(a, b) {
    for (var i = 0; i < a.length; i++) { if (a[i] !== b[i]) { return a[i] < b[i]; } }
    return false;
  }

  function value(id) {
    var el = document.getElementById(id);
    return el ? parseInt(el.value, 10) : NaN;
  }

  function preview() {
    var out = document.getElementById('timing-preview');
    if (!out) { return; }
    // The dongle's controller's ranges, as the page states them (bxCAN's, or FDCAN's for a CAN FD dongle).
    var limits = {
      prescaler: parseInt(out.getAttribute('data-prescaler-max'), 10),
      tseg1: parseInt(out.getAttribute('data-tseg1-max'), 10),
      tseg2: parseInt(out.getAttribute('data-tseg2-max'), 10)
    };
    var range = function (name) {
      return [parseInt(out.getAttribute('data-' + name + '-min'), 10),
        parseInt(out.getAttribute('data-' + name + '-max'), 10)];
    };
    var bitrates = range('bitrate');
    var samplePoints = range('sample-point');
    var raw = document.getElementById('can-use-raw');
    var t;
    if (raw && raw.checked) {
      t = { prescaler: value('can-prescaler'), tseg1: value('can-tseg1'), tseg2: value('can-tseg2') };
      if ([t.prescaler, t.tseg1, t.tseg2].some(isNaN)) {
        out.innerHTML = '<p>Enter prescaler, tseg1 and tseg2 for the raw timing.</p>';
        return;
      }
      if (t.prescaler < 1 || t.prescaler > limits.prescaler || t.tseg1 < 1 || t.tseg1 > limits.tseg1 ||
          t.tseg2 < 1 || t.tseg2 > limits.tseg2) {
        out.innerHTML = '<p class="error">These raw values are outside the controller\u2019s ranges.</p>';
        return;
      }
    } else {
      var bitrate = value('can-bitrate');
      var sp = value('can-sample-point');
      if (isNaN(bitrate) || bitrate < bitrates[0] || bitrate > bitrates[1]) {
        out.innerHTML = '<p>Bitrate: ' + bitrates[0].toLocaleString('en') + ' to ' +
          bitrates[1].toLocaleString('en') + ' bit/s.</p>';
        return;
      }
      if (isNaN(sp) || sp < samplePoints[0] || sp > samplePoints[1]) {
        out.innerHTML = '<p>Sample point: ' + samplePoints[0] + ' to ' + samplePoints[1] + ' \u2030.</p>';
        return;
      }
      t = derive(bitrate, sp, limits);
      if (!t) {
        out.innerHTML = '<p class="error">No prescaler reaches ' + bitrate + ' bit/s within 1 % at 80 MHz.</p>';
        return;
      }
    }
    var quanta = 1 + t.tseg1 + t.tseg2;
    var tqNs = t.prescaler * 1e9 / CLOCK;
    var rate = Math.round(CLOCK / (t.prescaler * quanta));
    var spOut = Math.round((1 + t.tseg1) * 1000 / quanta);
    out.innerHTML =
      '<p><strong>Timing preview</strong> (80 MHz CAN clock): ' +
      '<span data-preview="bitrate">' + rate.toLocaleString('en-US') + '</span> bit/s, sample point ' +
      '<span data-preview="sample_point_permille">' + spOut + '</span> \u2030.</p>' +
      '<p>Prescaler <span data-preview="prescaler">' + t.prescaler + '</span>, time quantum ' +
      tqNs.toFixed(1) + ' ns, ' + quanta + ' quanta per bit: 1 + tseg1 <span data-preview="tseg1">' +
      t.tseg1 + '</span> + tseg2 <span data-preview="tseg2">' + t.tseg2 + '</span>.</p>';
  }

  var canForm = document.getElementById('can-config');
  if (canForm) {
    canForm.addEventListener('input', preview);
    canForm.addEventListener('change', preview);
    preview();
  }

  B.onOk['can-applied'] = async function (form, data) {
    await B.refreshRegions(['can-effective']);
    var e = data.effective || {};
    B.showStatus(form, 'Applied: the dongle acknowledged ' + e.bitrate + ' bit/s, sample point ' +
      e.sample_point_permille + ' \u2030 (prescaler ' + e.prescaler + ', tseg1 ' + e.tseg1 + ', tseg2 ' +
      e.tseg2 + ', sjw ' + e.sjw + ').');
  };
  B.onError['can-applied'] = function (form, e) {
    var field = e.body && e.body.details && e.body.details.field;
    if (!field) { return; }
    var input = form.querySelector('[name="' + field + '"], [name^="' + field + ':"]');
    if (input && input.type !== 'hidden') { input.focus(); }
  };

  // ---- Commands --------------------------------------------------------------------------------
  B.onOk['command-queued'] = async function (form, data) {
    var box = document.getElementById('command-output');
    var name = form.querySelector('[name="command"]').value;
    var args = form.querySelector('[name="args:words"]').value.trim();
    box.hidden = false;
    box.querySelector('[data-command-name]').textContent = name + (args ? ' ' + args : '');
    var status = box.querySelector('[data-command-status]');
    var stdout = box.querySelector('[data-command-stdout]');
    var stderr = box.querySelector('[data-command-stderr]');
    var exit = box.querySelector('[data-command-exit]');
    stdout.textContent = '';
    stderr.hidden = true;
    exit.textContent = '';
    function show(s) {
      status.textContent = s;
      status.className = 'badge ' + ({ done: 'ok', error: 'bad', timeout: 'bad' }[s] || 'warn');
    }
    show(data.status || 'queued');
    var path = '/dongles/' + dongleId + '/commands/' + data.command_id;
    for (var i = 0; i < 900; i++) {
      await new Promise(function (r) { setTimeout(r, i < 20 ? 200 : 500); });
      var c;
      try { c = (await B.api('GET', path)).data; } catch (e) {
        if (e instanceof B.ApiError && e.signedOut()) { B.signedOut(); return; }
        continue;
      }
      show(c.status);
      if (['done', 'error', 'timeout'].indexOf(c.status) >= 0) {
        stdout.textContent = c.stdout || '';
        if (c.truncated) { stdout.textContent += '\n[output cut]'; }
        if (c.stderr) { stderr.textContent = c.stderr; stderr.hidden = false; }
        exit.textContent = c.exit_code === null || c.exit_code === undefined ? '' : 'exit code ' + c.exit_code;
        await B.refreshRegions(['commands']);
        return;
      }
    }
  };

  // ---- Frames sent by hand --------------------------------------------------------------------
  B.onOk['frame-sent'] = function (form) {
    B.showStatus(form, 'Sent: the dongle took the frame; the console shows it as tx.');
  };

  // ---- Presence --------------------------------------------------------------------------------
  var presenceEl = document.querySelector('[data-dongle-presence] [data-presence]');
  if (presenceEl) {
    setInterval(async function () {
      if (document.hidden) { return; }
      try {
        var d = (await B.api('GET', '/dongles/' + dongleId)).data;
        B.setPresence(document.querySelector('[data-dongle-presence] [data-presence]'), d.online);
      } catch (e) {
        if (e instanceof B.ApiError && e.signedOut()) { B.signedOut(); }
      }
    }, 5000);
  }
  document.addEventListener('console-event', function (ev) {
    var d = ev.detail;
    if (d.type === 'presence' && d.data.dongle_id === dongleId) {
      B.setPresence(document.querySelector('[data-dongle-presence] [data-presence]'), d.data.online);
    }
  });
})();

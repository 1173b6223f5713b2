// A group's page: its state, which side is offline, the backlog per direction with a chart drawn on
// a canvas, and replay progress. The state comes from GET /groups/{id} once a second and from the
// console's group_state events as they happen.
(function () {
  'use strict';
  var B = window.Bridge;
  var region = document.querySelector('[data-group]');
  if (!B || !region) { return; }
  var groupId = region.getAttribute('data-group');
  var SPAN = 120; // seconds in the chart
  var history = { a_to_b: [], b_to_a: [] };
  var peak = { a_to_b: 0, b_to_a: 0 };
  var latest = null;
  // The largest backlog read since the chart's last point, so that a short peak is drawn too.
  var highest = { a_to_b: 0, b_to_a: 0 };

  var EXPLAIN = {
    ACTIVE: 'Both sides are online: frames go from each side to the other as they come.',
    INACTIVE: 'Not relaying: activate the group to start.',
    CROSS_INSTANCE: 'Both sides are online, connected to different server instances: frames go from each side to the other through the database, a few milliseconds later than on one instance.',
    DEGRADED: 'One side is offline: the server keeps the frames for it (10 minutes or 200 000 frames per direction) and replays them in order when it is back.',
    AWAY: 'the server keeps the frames for it (10 minutes or 200 000 frames per direction) and replays them in order when it is back.'
  };

  function stateOf(g) { return g.state || '?'; }
  function count(g, what, dir) {
    var v = g[what] && g[what][dir];
    return typeof v === 'number' ? v : 0;
  }
  function backlog(g, dir) { return count(g, 'backlog', dir); }
  function badgeClass(state) {
    return { ACTIVE: 'ok', CROSS_INSTANCE: 'ok', DEGRADED: 'warn' }[state] || 'off';
  }

  function q(sel) { return document.querySelector(sel); }

  function show(g) {
    latest = g;
    var state = stateOf(g);
    var stateEl = q('[data-group-state]');
    if (stateEl) {
      stateEl.innerHTML = '';
      var badge = document.createElement('span');
      badge.className = 'badge ' + badgeClass(state);
      badge.textContent = state;
      stateEl.appendChild(badge);
    }
    var explain = q('[data-group-explain]');
    if (explain) { explain.textContent = EXPLAIN[state] || ''; }
    ['a_to_b', 'b_to_a'].forEach(function (dir) {
      var n = backlog(g, dir);
      if (n > highest[dir]) { highest[dir] = n; }
      var el = q('[data-backlog="' + dir + '"]');
      if (el) { el.textContent = String(n); }
      // Frames waiting for side B travel A to B, and the other way round.
      var side = dir === 'a_to_b' ? 'b' : 'a';
      var waiting = q('[data-waiting="' + side + '"]');
      if (waiting) { waiting.textContent = String(n); }
    });
    ['frames_relayed', 'frames_trimmed'].forEach(function (what) {
      ['a_to_b', 'b_to_a'].forEach(function (dir) {
        var el = q('[data-count="' + what + '.' + dir + '"]');
        if (el && g[what]) { el.textContent = String(count(g, what, dir)); }
      });
    });
    ['a', 'b'].forEach(function (side) {
      // Frames lost at a side's workstation or in its dongle (the agent's drops and what the dongle
      // reports it lost), before they reached the server or the dongle's bus.
      var lost = q('[data-lost="' + side + '"]');
      if (lost && g.agent_drops) { lost.textContent = String(g.agent_drops[side] || 0); }
      var d = g['dongle_' + side];
      if (!d) { return; }
      var row = q('tr[data-side="' + side + '"]');
      if (row) { B.setPresence(row.querySelector('[data-presence]'), d.online); }
      var conn = q('[data-connected="' + side + '"]');
      if (conn) { conn.textContent = d.data_connected ? 'connected' : 'not connected'; }
    });
    var pressure = q('[data-pressure]');
    if (pressure && g.buffer_pressure !== undefined) {
      pressure.hidden = !g.buffer_pressure;
      if (g.buffer_pressure) {
        pressure.textContent = 'Buffer pressure: retention was reached and the oldest kept frames were dropped (each trim is audited).';
      }
    }
    // A side is away when its agent is offline or its data connection is closed (presence follows
    // the agents' heartbeats, so the data connection tells first).
    var away = ['a', 'b'].filter(function (side) {
      var d = g['dongle_' + side];
      return d && (!d.online || !d.data_connected);
    });
    if (explain && state === 'DEGRADED' && away.length) {
      explain.textContent = 'Side ' + away.map(function (s) { return s.toUpperCase(); }).join(' and ') +
        ' is offline (' + (away.length > 1 ? 'their agents are' : 'its agent is') +
        ' not connected): ' + EXPLAIN.AWAY;
    }
    region.setAttribute('data-state', state);
    region.setAttribute('data-backlog-total', String(backlog(g, 'a_to_b') + backlog(g, 'b_to_a')));
  }

  function sample() {
    ['a_to_b', 'b_to_a'].forEach(function (dir) {
      var now = latest ? backlog(latest, dir) : 0;
      var n = Math.max(now, highest[dir]);
      highest[dir] = now;
      history[dir].push(n);
      if (history[dir].length > SPAN) { history[dir].shift(); }
      if (n > peak[dir]) { peak[dir] = n; }
      if (n === 0 && latest && stateOf(latest) === 'ACTIVE') { peak[dir] = 0; }
    });
    var text = [];
    [['a_to_b', 'A \u2192 B'], ['b_to_a', 'B \u2192 A']].forEach(function (d) {
      var now = latest ? backlog(latest, d[0]) : 0;
      var hist = history[d[0]];
      var before = hist.length > 1 ? hist[hist.length - 2] : now;
      if (peak[d[0]] > 0 && now < before && latest && stateOf(latest) !== 'DEGRADED') {
        var done = peak[d[0]] - now;
        text.push(d[1] + ': replaying, ' + done + ' of ' + peak[d[0]] + ' frames sent (' +
          Math.round(done * 100 / peak[d[0]]) + ' %).');
      } else if (now > 0) {
        text.push(d[1] + ': ' + now + ' frames waiting.');
      }
    });
    var replay = q('[data-replay]');
    if (replay) {
      replay.textContent = text.length ? text.join(' ') : 'Nothing waiting: every frame has been delivered.';
    }
    if (window.BridgeCharts) {
      window.BridgeCharts.draw(q('[data-backlog-chart]'), [
        { values: history.a_to_b, color: '#1d4f91', label: 'A \u2192 B' },
        { values: history.b_to_a, color: '#bc4c00', label: 'B \u2192 A' }
      ], SPAN, 's');
    }
  }

  async function poll() {
    try {
      var g = (await B.api('GET', '/groups/' + groupId)).data;
      show(g);
    } catch (e) {
      if (e instanceof B.ApiError && e.signedOut()) { B.signedOut(); return; }
      if (e instanceof B.ApiError && e.status === 404) { location.assign('/groups'); return; }
    }
  }

  document.addEventListener('console-event', function (ev) {
    var d = ev.detail;
    if (d.type === 'group_state' && d.data && d.data.detail && typeof d.data.detail === 'object') {
      // The event has the state, pressure and backlog; the rest stays as last read.
      var merged = Object.assign({}, latest || {}, d.data.detail);
      show(merged);
    }
    if (d.type === 'presence') {
      var row = q('tr[data-side][data-dongle-id="' + d.data.dongle_id + '"]');
      if (row) { B.setPresence(row.querySelector('[data-presence]'), d.data.online); }
    }
  });

  // After an action the state region is refreshed from the server: read it again at once.
  B.onOk.refresh = (function (original) {
    return async function (form, data) {
      await original(form, data);
      await poll();
    };
  })(B.onOk.refresh);

  window.BridgeGroup = { history: history };
  poll();
  setInterval(function () { if (!document.hidden) { poll(); } }, 1000);
  setInterval(sample, 1000);
})();

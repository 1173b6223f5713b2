// The admins' latency test of a group: says how long the run takes while it runs, then fills in the
// result from POST /admin/groups/{id}/latency-test.
(function () {
  'use strict';
  var B = window.Bridge;
  var form = document.getElementById('latency-test');
  var result = document.querySelector('[data-latency-result]');
  if (!B || !form || !result) { return; }

  form.addEventListener('submit', function () {
    var seconds = parseInt(form.querySelector('[name="seconds:int"]').value, 10) || 0;
    result.hidden = true;
    // After the shared handler has cleared the form's status line.
    setTimeout(function () {
      B.showStatus(form, 'Measuring for ' + seconds + ' s, then waiting for the last echoes\u2026');
    }, 0);
  });

  function ms(v) { return typeof v === 'number' ? v.toFixed(2) + ' ms' : '\u2014'; }

  B.onOk['latency-measured'] = function (f, data) {
    var rtt = data.round_trip_ms || {};
    var values = {
      sent: String(data.sent), received: String(data.received), lost: String(data.lost),
      duplicates: String(data.duplicates), out_of_order: String(data.out_of_order),
      'rtt.min': ms(rtt.min), 'rtt.p50': ms(rtt.p50), 'rtt.p95': ms(rtt.p95),
      'rtt.p99': ms(rtt.p99), 'rtt.max': ms(rtt.max)
    };
    Object.keys(values).forEach(function (key) {
      var el = result.querySelector('[data-latency="' + key + '"]');
      if (el) { el.textContent = values[key]; }
    });
    result.hidden = false;
    B.showStatus(f, data.lost === 0 ? 'Done: every probe came back.' : 'Done: ' + data.lost + ' probes did not come back.');
    result.querySelector('h2').focus();
  };
})();

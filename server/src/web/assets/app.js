// The dashboard's core: the JSON API with the session cookie and the CSRF token, forms sent with
// fetch(), regions of a page refreshed from the server, presence kept up to date, and a signed-out
// session noticed. Pages work without it; it makes them live.
(function () {
  'use strict';

  var API = '/api/v1';
  var signedInPage = !!document.querySelector('header form.logout');
  var csrfToken = null;

  function ApiError(status, body, headers) {
    this.status = status;
    this.body = body || {};
    this.code = this.body.code || '';
    this.headers = headers;
  }
  ApiError.prototype.signedOut = function () {
    return this.code === 'AUTH_REQUIRED' || this.code === 'AUTH_SESSION_EXPIRED';
  };
  // The API's message with what its details add for people, as the server's pages say it.
  ApiError.prototype.text = function () {
    var text = this.body.message || ('The request failed (' + this.status + ').');
    var details = this.body.details || {};
    if (typeof details.attempts_left === 'number') {
      text += ' ' + details.attempts_left + ' attempt' + (details.attempts_left === 1 ? '' : 's') + ' left.';
    }
    if (details.reason) { text += ' (' + details.reason + ')'; }
    var wait = this.headers && this.headers.get('Retry-After');
    if (wait) { text += ' Try again in ' + wait + ' s.'; }
    return text;
  };

  // The session's CSRF token, from GET /auth/csrf ('' without a session).
  async function csrf(renew) {
    if (csrfToken === null || renew) {
      try {
        var res = await fetch(API + '/auth/csrf', { credentials: 'same-origin', headers: { Accept: 'application/json' } });
        csrfToken = res.ok ? (await res.json()).csrf_token : '';
      } catch (e) {
        csrfToken = null;
        throw e;
      }
    }
    return csrfToken;
  }

  // Calls the API; resolves to { data, res }, rejects with an ApiError for an answer of 400 or more.
  async function api(method, path, body) {
    method = method || 'GET';
    var unsafe = method !== 'GET' && method !== 'HEAD';
    for (var attempt = 0; attempt < 2; attempt++) {
      var headers = { Accept: 'application/json' };
      if (body !== undefined) { headers['Content-Type'] = 'application/json'; }
      if (unsafe) {
        var token = await csrf(attempt > 0);
        if (token) { headers['X-CSRF-Token'] = token; }
      }
      var res = await fetch(API + path, {
        method: method,
        headers: headers,
        credentials: 'same-origin',
        body: body === undefined ? undefined : JSON.stringify(body)
      });
      var data = null;
      var raw = await res.text();
      if (raw) { try { data = JSON.parse(raw); } catch (e) { data = null; } }
      if (res.ok) { return { data: data, res: res }; }
      var error = new ApiError(res.status, data, res.headers);
      // A token from before a new sign-in: fetch the current one and try once more.
      if (unsafe && error.code === 'CSRF_INVALID' && attempt === 0) { continue; }
      throw error;
    }
  }

  function signedOut() {
    if (!signedInPage) { return; }
    var here = location.pathname + location.search;
    location.assign('/login?notice=signed_out&next=' + encodeURIComponent(here));
  }

  // `next` with each {field} replaced by that field of the answer, as the server's /forms does.
  function fill(next, data) {
    return next.replace(/\{([a-z_]+)\}/g, function (_, key) {
      var v = data && data[key];
      return v === undefined || v === null ? '' : encodeURIComponent(String(v));
    });
  }

  function localPath(next) {
    return /^\/(?![\/\\])/.test(next || '') ? next : '/';
  }

  // The JSON body of a form, by the field-name types of the server's /forms.
  function bodyOf(form) {
    var body = {};
    var data = new FormData(form);
    data.forEach(function (raw, name) {
      if (name.charAt(0) === '_') { return; }
      var parts = name.split(':');
      var key = parts[0];
      var kind = parts[1] || '';
      var value = String(raw).trim();
      var out;
      switch (kind) {
        case '': out = String(raw); break;
        case 'opt': out = value === '' ? undefined : value; break;
        case 'int':
          if (value === '') { out = undefined; break; }
          if (!/^-?\d+$/.test(value)) { throw new Error(key + ' must be a whole number.'); }
          out = parseInt(value, 10); break;
        case 'hex':
          if (value === '') { out = undefined; break; }
          var digits = value.replace(/^0x/i, '');
          if (!/^[0-9a-f]+$/i.test(digits)) { throw new Error(key + ' must be a number in hex.'); }
          out = parseInt(digits, 16); break;
        case 'bool': out = value === 'true' || value === 'on' || value === '1'; break;
        case 'words': out = value === '' ? [] : value.split(/\s+/); break;
        default: throw new Error('unknown field type ' + name);
      }
      if (out === undefined) { delete body[key]; } else { body[key] = out; }
    });
    return body;
  }

  function meta(form, name) {
    var el = form.querySelector('input[name="' + name + '"]');
    return el ? el.value : '';
  }

  function showError(form, text) {
    var el = form.querySelector('.form-error');
    if (!el) { return; }
    el.textContent = text;
    el.hidden = !text;
  }

  function showStatus(form, text) {
    var el = form.querySelector('.form-status');
    if (el) { el.textContent = text || ''; }
  }

  // Regions (`data-region`) of the page fetched anew from the server and swapped in.
  async function refreshRegions(names) {
    var res = await fetch(location.href, { credentials: 'same-origin', headers: { Accept: 'text/html' } });
    if (res.redirected && new URL(res.url).pathname === '/login') { signedOut(); return; }
    if (!res.ok) { return; }
    var doc = new DOMParser().parseFromString(await res.text(), 'text/html');
    document.querySelectorAll('[data-region]').forEach(function (el) {
      var name = el.getAttribute('data-region');
      if (names && names.indexOf(name) < 0) { return; }
      var fresh = doc.querySelector('[data-region="' + name + '"]');
      if (!fresh) { return; }
      var hadFocus = el.contains(document.activeElement);
      el.innerHTML = fresh.innerHTML;
      localizeTimes(el);
      if (hadFocus) {
        var heading = el.querySelector('h2, h3') || el;
        if (!heading.hasAttribute('tabindex')) { heading.setAttribute('tabindex', '-1'); }
        heading.focus();
      }
    });
  }

  function localizeTimes(root) {
    (root || document).querySelectorAll('time[datetime]').forEach(function (el) {
      var at = new Date(el.getAttribute('datetime'));
      if (!isNaN(at)) { el.textContent = at.toLocaleString(); el.title = el.getAttribute('datetime'); }
    });
  }

  // What a form does after the API said yes, by its data-ok; pages add their own.
  var onOk = {
    redirect: function (form, data) {
      var next = fill(localPath(meta(form, '_next')), data);
      var notice = meta(form, '_notice');
      if (notice) { next += (next.indexOf('?') < 0 ? '?' : '&') + 'notice=' + encodeURIComponent(notice); }
      location.assign(next);
    },
    refresh: async function (form) {
      var notice = meta(form, '_notice');
      await refreshRegions();
      // The notice of an earlier action is old news now.
      document.querySelectorAll('[data-notice]').forEach(function (el) { el.remove(); });
      var text = notice && NOTICES[notice] ? NOTICES[notice] : 'Done.';
      announce(text);
    }
  };
  var onError = {};

  var NOTICES = {
    saved: 'Saved.', revoked: 'The agent\u2019s tokens are revoked.', disabled: 'The user is disabled.',
    enabled: 'The user is enabled.', activated: 'The group is activated.', deactivated: 'The group is deactivated.',
    deleted: 'Deleted.'
  };

  // A message for screen readers and eyes alike, near the top of the page.
  function announce(text) {
    var el = document.querySelector('[data-announce]');
    if (!el) {
      el = document.createElement('p');
      el.className = 'notice';
      el.setAttribute('role', 'status');
      el.setAttribute('data-announce', '');
      var h1 = document.querySelector('main h1');
      h1.parentNode.insertBefore(el, h1.nextSibling);
    }
    el.textContent = text;
  }

  document.addEventListener('submit', async function (ev) {
    var form = ev.target;
    if (!form.classList || !form.classList.contains('api-form')) { return; }
    ev.preventDefault();
    var button = ev.submitter || form.querySelector('button[type="submit"]');
    if (button && button.dataset.confirm && !window.confirm(button.dataset.confirm)) { return; }
    var method = meta(form, '_method') || 'POST';
    var path = meta(form, '_api');
    var body;
    try { body = bodyOf(form); } catch (e) { showError(form, e.message); return; }
    if (method === 'DELETE' && Object.keys(body).length === 0) { body = undefined; }
    showError(form, '');
    showStatus(form, '');
    if (button) { button.setAttribute('aria-busy', 'true'); button.disabled = true; }
    try {
      var answer = await api(method, path, body);
      var handler = onOk[form.dataset.ok] || onOk.refresh;
      await handler(form, answer.data || {}, answer.res);
    } catch (e) {
      if (e instanceof ApiError) {
        if (e.signedOut() && path !== '/auth/login') { signedOut(); return; }
        showError(form, e.text());
        var h = onError[form.dataset.ok];
        if (h) { h(form, e); }
      } else {
        showError(form, 'The server could not be reached (' + e.message + '). Try again.');
      }
    } finally {
      if (button) { button.removeAttribute('aria-busy'); button.disabled = false; }
    }
  });

  // The dongle list: presence every 5 s, the whole table when the set of dongles changed.
  function pollDongles(region) {
    async function tick() {
      try {
        var items = (await api('GET', '/dongles')).data.items || [];
        var rows = region.querySelectorAll('tr[data-dongle-id]');
        var changed = rows.length !== items.length;
        items.forEach(function (d) {
          var row = region.querySelector('tr[data-dongle-id="' + d.id + '"]');
          if (!row) { changed = true; return; }
          setPresence(row.querySelector('[data-presence]'), d.online);
        });
        if (changed) { await refreshRegions(['dongles']); }
      } catch (e) {
        if (e instanceof ApiError && e.signedOut()) { signedOut(); return; }
      }
      setTimeout(tick, 5000);
    }
    setTimeout(tick, 5000);
  }

  function setPresence(el, online) {
    if (!el) { return; }
    el.textContent = online ? 'online' : 'offline';
    el.className = 'badge ' + (online ? 'ok' : 'off');
  }

  // Every signed-in page notices a session that ended (signed out elsewhere, user disabled).
  function watchSession() {
    setInterval(async function () {
      if (document.hidden) { return; }
      try { await api('GET', '/auth/me'); } catch (e) {
        if (e instanceof ApiError && e.signedOut()) { signedOut(); }
      }
    }, 10000);
  }

  // The agents page: the token shown once, copied, then hidden for good.
  onOk['agent-registered'] = async function (form, data) {
    var box = document.getElementById('agent-token');
    box.querySelector('[data-new-agent-id]').textContent = data.agent_id || '';
    box.querySelector('[data-agent-token]').textContent = data.agent_token || '';
    box.querySelector('[data-agent-ws]').textContent = data.ws_url || '';
    box.hidden = false;
    form.reset();
    await refreshRegions(['agents']);
    box.querySelector('[data-copy-token]').focus();
  };
  document.addEventListener('click', function (ev) {
    var copy = ev.target.closest('[data-copy-token]');
    if (copy) {
      var code = document.querySelector('[data-agent-token]');
      var done = function () { copy.textContent = 'Copied'; };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(code.textContent).then(done, function () { selectText(code); });
      } else { selectText(code); }
    }
    var hide = ev.target.closest('[data-hide-token]');
    if (hide) {
      var box = document.getElementById('agent-token');
      box.querySelectorAll('code').forEach(function (c) { c.textContent = ''; });
      box.hidden = true;
    }
  });
  function selectText(el) {
    var range = document.createRange();
    range.selectNodeContents(el);
    var sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
  }

  // A notice from the address (?notice=) is shown once: a reload does not repeat it.
  if (/[?&]notice=/.test(location.search) && history.replaceState) {
    var params = new URLSearchParams(location.search);
    params.delete('notice');
    var q = params.toString();
    history.replaceState(null, '', location.pathname + (q ? '?' + q : '') + location.hash);
  }

  localizeTimes();
  var list = document.querySelector('[data-poll-dongles]');
  if (list) { pollDongles(list); }
  if (signedInPage) { watchSession(); }

  window.Bridge = {
    api: api, csrf: csrf, ApiError: ApiError, onOk: onOk, onError: onError, refreshRegions: refreshRegions,
    showError: showError, showStatus: showStatus, signedOut: signedOut, setPresence: setPresence,
    announce: announce, localizeTimes: localizeTimes
  };
})();

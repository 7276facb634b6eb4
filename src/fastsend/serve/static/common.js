// fastsend dashboard: what app.js and charts.js share, written once. The API
// key lives in this tab's sessionStorage and leaves it only as the
// Authorization header of a same-origin fetch (no cookie, no referrer, no
// cache); values reach the DOM only through textContent.
'use strict';

window.fastsendDashboard = Object.freeze((() => {
  const STORE = 'fastsend.dashboard.key';

  function storage() {
    try { return window.sessionStorage; } catch (e) { return null; }
  }

  return {
    savedKey() {
      const st = storage();
      return st ? st.getItem(STORE) : null;
    },
    saveKey(k) {
      const st = storage();
      if (st) st.setItem(STORE, k);
    },
    forgetKey() {
      const st = storage();
      if (st) st.removeItem(STORE);
    },
    // {status, body}: body is the parsed JSON answer, or null
    async request(method, path, key) {
      const r = await fetch(path, {
        method,
        headers: { Authorization: 'Bearer ' + key, Accept: 'application/json' },
        cache: 'no-store',
        credentials: 'omit',
        referrerPolicy: 'no-referrer',
      });
      let body = null;
      try { body = await r.json(); } catch (e) { body = null; }
      return { status: r.status, body };
    },
    el(tag, text, cls) {
      const e = document.createElement(tag);
      if (text !== undefined && text !== null) e.textContent = String(text);
      if (cls) e.className = cls;
      return e;
    },
  };
})());

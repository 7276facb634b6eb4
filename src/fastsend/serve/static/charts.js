// fastsend dashboard charts (issue 14): figures over time from GET /v1/stats,
// drawn on <canvas> by this script (no library, nothing external). Runs on the
// main dashboard (an "Over time" section), the campaign page and the IP page.
// Values reach the DOM only through textContent; the key (sessionStorage, set
// by the login of /dashboard) goes only into an Authorization header.
'use strict';

(() => {
  const common = window.fastsendDashboard; // common.js: key storage, requests, el
  const { el } = common;
  const REFRESH_MS = 3000;
  const PALETTE = ['#1a9850', '#e08e0b', '#d73027', '#4575b4', '#7b3294', '#35978f',
    '#bf812d', '#666666', '#c51b7d', '#01665e'];
  const RANGES = {
    '1h': { from: '-1h', granularity: 'minute' },
    '24h': { from: '-24h', granularity: 'hour' },
    '30d': { from: '-30d', granularity: 'day' },
  };
  const $ = (id) => document.getElementById(id);
  const page = document.body.dataset.page || 'main';
  let range = '1h';
  let timer = null;
  let updates = 0;
  let admin = null; // asked once: node-wide gauges and /v1/dmarc are for admin tenants

  function key() {
    return common.savedKey();
  }

  function pct(v) {
    return v === null || v === undefined ? '–' : (100 * v).toFixed(v < 0.01 ? 3 : 2) + '%';
  }

  async function get(path) {
    const k = key();
    if (!k) throw new Error('no key');
    const { status, body } = await common.request('GET', path, k);
    if (status !== 200) {
      const msg = body && body.error ? body.error.message : 'HTTP ' + status;
      throw new Error(msg);
    }
    return body;
  }

  function stats(params) {
    const q = new URLSearchParams({ ...RANGES[range], ...params });
    return get('/v1/stats?' + q.toString());
  }

  // ---------------------------------------------------------------- drawing
  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function label(t, step) {
    const d = new Date(t * 1000);
    const two = (n) => String(n).padStart(2, '0');
    if (step >= 86400) return (d.getUTCMonth() + 1) + '/' + d.getUTCDate();
    return two(d.getUTCHours()) + ':' + two(d.getUTCMinutes());
  }

  // lines: [{name, values, color}], hlines: [{value, name, color}], fmt: axis labels
  function draw(canvas, ts, step, lines, opts) {
    const o = opts || {};
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || 600;
    const h = canvas.clientHeight || 170;
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
    const c = canvas.getContext('2d');
    c.setTransform(dpr, 0, 0, dpr, 0, 0);
    c.clearRect(0, 0, w, h);
    const L = 52; const R = 8; const T = 8; const B = 20;
    let max = 0;
    for (const ln of lines) for (const v of ln.values) if (v !== null && v > max) max = v;
    for (const hl of o.hlines || []) if (hl.value > max && o.showLines) max = hl.value;
    max = niceMax(max * 1.05);
    const fmt = o.fmt || ((v) => (v >= 1000 ? (v / 1000).toFixed(1) + 'k' : String(+v.toFixed(2))));
    c.font = '11px system-ui, sans-serif';
    c.fillStyle = '#667085';
    c.strokeStyle = '#e3e6eb';
    c.lineWidth = 1;
    for (let i = 0; i <= 4; i++) {
      const y = T + (h - T - B) * (1 - i / 4);
      c.beginPath(); c.moveTo(L, y); c.lineTo(w - R, y); c.stroke();
      c.fillText(fmt((max * i) / 4), 2, y + 4);
    }
    const n = ts.length;
    const x = (i) => L + ((w - L - R) * (n <= 1 ? 0.5 : i / (n - 1)));
    const y = (v) => T + (h - T - B) * (1 - v / max);
    const every = Math.max(1, Math.ceil(n / 6));
    for (let i = 0; i < n; i += every) c.fillText(label(ts[i], step), x(i) - 14, h - 5);
    for (const hl of o.hlines || []) {
      if (hl.value > max) continue;
      c.strokeStyle = hl.color; c.setLineDash([5, 4]);
      c.beginPath(); c.moveTo(L, y(hl.value)); c.lineTo(w - R, y(hl.value)); c.stroke();
      c.setLineDash([]);
      c.fillStyle = hl.color; c.fillText(hl.name, w - R - c.measureText(hl.name).width, y(hl.value) - 3);
    }
    for (const ln of lines) {
      c.strokeStyle = ln.color; c.lineWidth = 1.8; c.beginPath();
      let pen = false;
      ln.values.forEach((v, i) => {
        if (v === null || v === undefined) { pen = false; return; }
        if (pen) c.lineTo(x(i), y(v)); else c.moveTo(x(i), y(v));
        pen = true;
      });
      c.stroke();
    }
    canvas.dataset.points = String(lines.reduce((a, l) => a + l.values.filter((v) => v !== null && v !== undefined).length, 0));
  }

  function legend(id, lines) {
    const p = $(id);
    if (!p) return;
    p.replaceChildren(...lines.map((ln) => {
      const s = el('span', ln.name, 'key');
      s.dataset.color = ln.color;
      const sw = el('i', '■');
      sw.className = 'swatch c' + PALETTE.indexOf(ln.color);
      s.prepend(sw);
      return s;
    }));
  }

  function ratio(a, b) {
    return a.map((v, i) => (b[i] ? v / b[i] : null));
  }

  function chart(id, ts, step, lines, opts) {
    const cv = $(id);
    if (!cv) return;
    draw(cv, ts, step, lines, opts);
    legend(id + '-legend', lines);
  }

  function groupLines(groups, counter) {
    return Object.entries(groups).slice(0, 8).map(([name, g], i) => ({
      name, color: PALETTE[i % PALETTE.length], values: g.series ? g.series[counter] : [],
    }));
  }

  function ratesTable(table, groups, linkOf) {
    if (!table) return;
    const body = table.tBodies[0];
    const rows = Object.entries(groups).map(([name, g]) => {
      const tr = el('tr');
      const td = el('td', null, 'name');
      const href = linkOf ? linkOf(name, g) : null;
      if (href) { const a = el('a', name); a.href = href; td.append(a); } else td.textContent = name;
      tr.append(td);
      const c = g.counts;
      for (const v of [c.delivered || 0, c.bounced || 0, c.deferred || 0]) tr.append(el('td', v.toLocaleString('en-US'), 'num'));
      for (const r of ['bounce_rate', 'complaint_rate', 'unique_open_rate', 'click_rate', 'click_to_open_rate']) {
        const td2 = el('td', pct(g.rates[r]), 'num');
        if (r === 'complaint_rate' && g.rates[r] !== null && g.rates[r] >= 0.003) td2.className += ' over';
        tr.append(td2);
      }
      const m = el('td', ((c.opens_machine || 0) + ' / ' + (c.clicks_machine || 0)), 'num');
      tr.append(m);
      return tr;
    });
    body.replaceChildren(...rows);
  }

  function totalsInto(prefix, totals) {
    for (const [k, v] of Object.entries(totals.counts)) {
      const e = $(prefix + k); if (e) e.textContent = v.toLocaleString('en-US');
    }
    for (const [k, v] of Object.entries(totals.rates)) {
      const e = $(prefix + k); if (e) e.textContent = pct(v);
    }
  }

  // ---------------------------------------------------------------- pages
  async function refreshCharts(filter) {
    const all = await stats({ ...filter, dims: '', gauges: '1' });
    const ts = all.series.t; const s = all.series; const step = all.step;
    chart('ch-throughput', ts, step, [
      { name: 'accepted', color: PALETTE[3], values: s.accepted },
      { name: 'delivered', color: PALETTE[0], values: s.delivered },
      { name: 'deferred', color: PALETTE[1], values: s.deferred },
      { name: 'bounced', color: PALETTE[2], values: s.bounced },
    ]);
    const delivered = s.delivered;
    const final = s.delivered.map((v, i) => v + s.bounced[i] + s.expired[i]);
    chart('ch-rates', ts, step, [
      { name: 'bounce rate', color: PALETTE[2], values: ratio(s.bounced, final) },
      { name: 'complaint rate', color: PALETTE[4], values: ratio(s.complaints, delivered) },
      { name: 'unique open rate', color: PALETTE[0], values: ratio(s.opens_unique, delivered) },
      { name: 'click rate', color: PALETTE[3], values: ratio(s.clicks_unique, delivered) },
    ], { fmt: (v) => (100 * v).toFixed(2) + '%' });
    chart('ch-complaints', ts, step, [
      { name: 'complaint rate', color: PALETTE[4], values: ratio(s.complaints, delivered) },
    ], {
      fmt: (v) => (100 * v).toFixed(2) + '%', showLines: true,
      hlines: [{ value: 0.003, name: '0.3% Gmail/Yahoo line', color: '#d73027' },
        { value: 0.001, name: '0.1% target', color: '#e08e0b' }],
    });
    chart('ch-engagement', ts, step, [
      { name: 'opens (human)', color: PALETTE[0], values: s.opens },
      { name: 'opens (machine)', color: PALETTE[7], values: s.opens_machine },
      { name: 'clicks (human)', color: PALETTE[3], values: s.clicks },
      { name: 'clicks (machine)', color: PALETTE[8], values: s.clicks_machine },
    ]);
    const reasons = Object.entries(all.reasons_series.deferred)
      .sort((a, b) => b[1].reduce((x, y) => x + y, 0) - a[1].reduce((x, y) => x + y, 0)).slice(0, 6);
    chart('ch-deferrals', ts, step, reasons.map(([name, v], i) => ({ name, values: v, color: PALETTE[(i + 1) % PALETTE.length] })));
    let g = all.gauges || {};
    if (page === 'main') {
      if (admin === null) admin = !!(await get('/v1/dashboard')).admin;
      if (admin) { // the queue's age is node-wide (the spool's shape spans tenants)
        const node = await stats({ ...filter, dims: '', gauges: '1', scope: 'node' });
        g = { ...g, queue_oldest_min: (node.gauges || {}).queue_oldest_min };
      }
    }
    chart('ch-queue', ts, step, [
      { name: 'queue depth', color: PALETTE[3], values: g.queue_depth || ts.map(() => null) },
      { name: 'deferred', color: PALETTE[1], values: g.queue_deferred || ts.map(() => null) },
    ]);
    chart('ch-age', ts, step, [
      { name: 'oldest pending (min)', color: PALETTE[2], values: g.queue_oldest_min || ts.map(() => null) },
    ]);
    totalsInto('t-', all.totals);
    const byProv = await stats({ ...filter, dims: 'provider' });
    chart('ch-provider', ts, step, groupLines(byProv.groups, 'delivered'));
    ratesTable($('tbl-provider'), byProv.groups, null);
    if (page !== 'ip') {
      const byIp = await stats({ ...filter, dims: 'source_ip' });
      chart('ch-ip', ts, step, groupLines(byIp.groups, 'delivered'));
      ratesTable($('tbl-ip'), byIp.groups, (name) => (name ? '/dashboard/ip/' + encodeURIComponent(name) : null));
    }
    if (page === 'main') {
      const byCamp = await stats({ dims: 'campaign', granularity: 'total', from: RANGES[range].from });
      const list = await get('/v1/campaigns');
      const names = new Map(list.campaigns.map((c) => [String(c.id), c.name]));
      const named = {};
      for (const [id, g] of Object.entries(byCamp.groups)) named['#' + id + ' ' + (names.get(id) || '')] = { ...g, id };
      ratesTable($('tbl-campaign'), named, (name, g) => '/dashboard/campaign/' + encodeURIComponent(g.id));
    }
    if (page === 'main') await refreshDmarc();
    return all;
  }

  async function refreshDmarc() {
    const note = $('dmarc-note'); const table = $('tbl-dmarc');
    if (!note || !table) return;
    if (admin === null) admin = !!(await get('/v1/dashboard')).admin;
    if (!admin) {
      note.textContent = 'DMARC reports span tenants: shown to [dashboard] admin_tenants only.';
      table.hidden = true;
      return;
    }
    const d = await get('/v1/dmarc?from=-30d');
    const unaligned = d.sources.reduce((a, s) => a + s.unaligned, 0);
    note.textContent = d.reports + ' reports; ' + unaligned.toLocaleString('en-US') +
      ' messages failed DMARC alignment (neither DKIM nor SPF aligned).';
    table.hidden = d.sources.length === 0;
    table.tBodies[0].replaceChildren(...d.sources.map((s) => {
      const tr = el('tr', null, s.unaligned ? 'unaligned' : '');
      tr.append(el('td', s.source_ip, 'name'), el('td', s.header_from, 'name'), el('td', s.org, 'name'));
      for (const v of [s.messages, s.aligned, s.unaligned, s.dkim_aligned, s.spf_aligned]) tr.append(el('td', v.toLocaleString('en-US'), 'num'));
      if (s.unaligned) tr.lastChild.previousSibling.previousSibling.className += ' over';
      return tr;
    }));
  }

  async function refreshCampaign(id) {
    const c = await get('/v1/campaigns/' + encodeURIComponent(id));
    $('c-name').textContent = c.name + ' (#' + c.id + ')';
    $('c-status').textContent = c.reason ? c.status + ' (' + c.reason + ')' : c.status;
    $('c-progress').textContent = pct(c.progress);
    const st = $('c-states');
    st.replaceChildren(...Object.entries(c.counts).map(([k, v]) => {
      const tr = el('tr'); tr.append(el('td', k), el('td', v.toLocaleString('en-US'), 'num')); return tr;
    }));
    await refreshCharts({ campaign: String(id) });
  }

  async function refreshIp(ip) {
    const d = await get('/v1/dashboard/ip/' + encodeURIComponent(ip));
    $('ip-name').textContent = ip;
    $('ip-pool').textContent = d.pool || '–';
    const wu = d.warmup;
    $('ip-warmup').textContent = wu.warming
      ? 'day ' + wu.day + ' of ' + wu.days + ' (cap ' + wu.cap.toLocaleString('en-US') + ' per provider per day)'
      : (wu.day ? 'warm (schedule done)' : 'not warming');
    const wt = $('ip-providers').tBodies[0];
    wt.replaceChildren(...d.providers.map((p) => {
      const tr = el('tr'); tr.append(el('td', p.provider, 'name'), el('td', p.sent_today.toLocaleString('en-US'), 'num'));
      const td = el('td', null, 'num');
      if (wu.warming) { const pr = el('progress'); pr.max = wu.cap; pr.value = Math.min(wu.cap, p.sent_today); td.append(pr, el('span', ' ' + pct(p.sent_today / wu.cap))); } else td.textContent = '–';
      tr.append(td); return tr;
    }));
    const rt = $('ip-rests').tBodies[0];
    rt.replaceChildren(...d.rests.map((r) => {
      const tr = el('tr');
      tr.append(el('td', r.site, 'name'), el('td', r.action), el('td', new Date(r.until * 1000).toISOString().slice(11, 19) + 'Z', 'nowrap'), el('td', r.reason, 'name'));
      return tr;
    }));
    $('ip-rests-none').hidden = d.rests.length > 0;
    const bt = $('ip-blocklists').tBodies[0];
    bt.replaceChildren(...d.blocklists.map((b) => {
      const tr = el('tr');
      tr.append(el('td', b.zone, 'name'), el('td', b.listed ? 'LISTED' : 'not listed', b.listed ? 'over' : 'ok'),
        el('td', b.checked ? new Date(b.checked * 1000).toISOString().slice(0, 19) + 'Z' : 'never', 'nowrap'), el('td', b.text || '', 'name'));
      return tr;
    }));
    $('ip-blocklists-none').hidden = d.blocklists.length > 0;
    await refreshCharts({ source_ip: ip });
  }

  async function tick() {
    timer = null;
    const status = $('charts-status');
    if (!key()) {
      if (status) status.textContent = page === 'main' ? '' : 'No API key in this tab: log in on the dashboard first.';
      timer = setTimeout(tick, REFRESH_MS);
      return;
    }
    try {
      const parts = location.pathname.split('/');
      if (page === 'campaign') await refreshCampaign(decodeURIComponent(parts[parts.length - 1]));
      else if (page === 'ip') await refreshIp(decodeURIComponent(parts[parts.length - 1]));
      else if (!$('app') || !$('app').hidden) await refreshCharts({});
      updates += 1;
      document.body.dataset.chartUpdates = String(updates);
      if (status) status.textContent = 'updated ' + new Date().toISOString().slice(11, 19) + 'Z';
    } catch (e) {
      if (status) status.textContent = 'error: ' + e.message;
    }
    timer = setTimeout(tick, REFRESH_MS);
  }

  function init() {
    const sel = $('range');
    if (sel) {
      sel.addEventListener('change', () => {
        range = RANGES[sel.value] ? sel.value : '1h';
        if (timer !== null) clearTimeout(timer);
        tick();
      });
    }
    tick();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();

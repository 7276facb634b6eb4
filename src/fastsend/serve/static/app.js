// fastsend dashboard: polls /v1/dashboard with the key from sessionStorage.
// Every value from the server goes into the DOM through textContent (never
// innerHTML); the key goes only into an Authorization header.
'use strict';

(() => {
  const common = window.fastsendDashboard; // common.js: key storage, requests, el
  const { el } = common;
  const POLL_MS = 1000;
  const STATES = ['queued', 'inflight', 'deferred', 'delivered', 'bounced', 'suppressed',
    'expired', 'cancelled'];
  const OUTCOMES = ['delivered', 'deferred', 'bounced'];
  const COLORS = { delivered: '#1a9850', deferred: '#e08e0b', bounced: '#d73027' };

  const $ = (id) => document.getElementById(id);
  let key = null;
  let timer = null;
  let generation = 0; // bumps on login/logout so a late answer is ignored
  const campaignRows = new Map();

  function num(n) {
    if (typeof n === 'number') return n.toLocaleString('en-US');
    return n === undefined || n === null ? '' : String(n);
  }

  function setStatus(text, isError) {
    const s = $('status');
    s.textContent = text;
    s.className = isError ? 'error' : '';
  }

  function call(method, path) {
    return common.request(method, path, key);
  }

  // ---------------------------------------------------------------- login
  function showLogin(message) {
    generation += 1;
    if (timer !== null) { clearTimeout(timer); timer = null; }
    key = null;
    common.forgetKey();
    $('app').hidden = true;
    $('logout').hidden = true;
    $('login-box').hidden = false;
    $('login-error').textContent = message || '';
    $('who').textContent = '';
    setStatus('', false);
    campaignRows.clear();
    $('campaigns').tBodies[0].replaceChildren();
    $('key').focus();
  }

  function start(k) {
    key = k;
    generation += 1;
    $('login-box').hidden = true;
    $('app').hidden = false;
    $('logout').hidden = false;
    setStatus('connecting…', false);
    poll(generation);
  }

  $('login').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const input = $('key');
    const k = input.value.trim();
    input.value = '';
    if (!k) return;
    common.saveKey(k);
    start(k);
  });
  $('logout').addEventListener('click', () => showLogin('Key forgotten.'));

  // ---------------------------------------------------------------- polling
  async function poll(gen) {
    timer = null;
    try {
      const r = await call('GET', '/v1/dashboard');
      if (gen !== generation) return;
      if (r.status === 401) { showLogin('That key was not accepted (401).'); return; }
      if (r.status !== 200 || !r.body) {
        const msg = r.body && r.body.error ? r.body.error.message : 'HTTP ' + r.status;
        setStatus('error: ' + msg, true);
      } else {
        render(r.body);
        if (r.body.admin) {
          const w = await call('GET', '/v1/dashboard/workers');
          if (gen !== generation) return;
          if (w.status === 200 && w.body) renderWorkers(w.body);
        } else {
          $('workers').hidden = true;
          $('workers-note').textContent = 'Worker status spans tenants: it is shown only to '
            + 'tenants listed in [dashboard] admin_tenants. Tenant "' + r.body.tenant
            + '" sees its own mail only.';
          $('ips-note').textContent = 'Your mail only.';
        }
        setStatus('updated ' + new Date(r.body.time * 1000).toLocaleTimeString('en-GB'), false);
      }
    } catch (e) {
      if (gen !== generation) return;
      setStatus('server unreachable; retrying', true);
    }
    if (gen === generation) timer = setTimeout(() => poll(gen), POLL_MS);
  }

  // ---------------------------------------------------------------- rendering
  function render(d) {
    $('who').textContent = 'tenant ' + d.tenant;
    $('queue-depth').textContent = num(d.queue_depth);
    for (const w of document.querySelectorAll('.window')) w.textContent = String(d.window_min);
    renderStates(d.states || {});
    renderChart(d.series);
    renderCampaigns(d.campaigns || []);
    renderDomains(d.domains || [], d.pending_by_domain || []);
    fillTable($('ips'), (d.source_ips || []).map(
      (r) => [r.source_ip, r.delivered, r.deferred, r.bounced]));
    renderEvents(d.events || []);
  }

  function renderStates(states) {
    const body = $('states').tBodies[0];
    if (!body.rows.length) {
      for (const s of STATES) {
        const tr = el('tr');
        tr.append(el('th', s));
        const td = el('td', '0', 'num');
        td.id = 'st-' + s;
        tr.append(td);
        body.append(tr);
      }
    }
    for (const s of STATES) $('st-' + s).textContent = num(states[s] || 0);
  }

  function fillTable(table, rows) {
    const body = table.tBodies[0];
    const out = rows.map((cells) => {
      const tr = el('tr');
      cells.forEach((c, i) => tr.append(el('td', i === 0 ? c : num(c), i === 0 ? '' : 'num')));
      return tr;
    });
    if (!out.length) {
      const tr = el('tr');
      const td = el('td', 'nothing yet', 'note');
      td.colSpan = table.tHead ? table.tHead.rows[0].cells.length : 1;
      tr.append(td);
      out.push(tr);
    }
    body.replaceChildren(...out);
  }

  function renderDomains(rows, pending) {
    const pend = new Map(pending.map((p) => [p.domain, p.pending]));
    const seen = new Set();
    const cells = rows.map((r) => {
      seen.add(r.domain);
      return [r.domain, r.delivered, r.deferred, r.bounced, pend.get(r.domain) || 0];
    });
    for (const p of pending) {
      if (!seen.has(p.domain)) cells.push([p.domain, 0, 0, 0, p.pending]);
    }
    fillTable($('domains'), cells);
  }

  function renderEvents(events) {
    const items = events.map((e) => {
      const t = typeof e.time === 'number'
        ? new Date(e.time * 1000).toLocaleTimeString('en-GB') : '';
      const parts = [t, e.event];
      if (e.rcpt) parts.push(e.rcpt);
      if (e.campaign !== undefined) parts.push('campaign ' + e.campaign);
      if (e.code) parts.push(String(e.code) + (e.enhanced ? ' ' + e.enhanced : ''));
      if (e.text) parts.push(e.text);
      if (e.source_ip) parts.push('from ' + e.source_ip);
      return el('li', parts.join('  '), 'ev-' + String(e.event).replace(/[^a-z_]/g, ''));
    });
    if (!items.length) items.push(el('li', 'no events since the server started', 'note'));
    $('events').replaceChildren(...items);
  }

  // Campaign rows are kept (keyed by id) so a button is not replaced under a click.
  function renderCampaigns(campaigns) {
    const body = $('campaigns').tBodies[0];
    const keep = new Set();
    for (const c of campaigns) {
      const id = String(c.id);
      keep.add(id);
      let row = campaignRows.get(id);
      if (!row) {
        row = makeCampaignRow(id);
        campaignRows.set(id, row);
      }
      row.name.textContent = c.name || '(unnamed)';
      row.status.textContent = c.status;
      row.status.title = c.reason || ''; // why (a guardrail's pause)
      row.status.className = 'status-' + String(c.status).replace(/[^a-z]/g, '');
      row.progress.value = c.progress || 0;
      row.pct.textContent = ' ' + (100 * (c.progress || 0)).toFixed(1) + '%';
      const counts = c.counts || {};
      row.counts.textContent = STATES.filter((s) => counts[s])
        .map((s) => s + ' ' + num(counts[s])).join(' · ') + '  (of ' + num(c.total) + ')';
      row.pause.disabled = c.status !== 'active';
      row.resume.disabled = c.status !== 'paused';
      body.append(row.tr); // keeps the order of the answer (newest first)
    }
    for (const [id, row] of campaignRows) {
      if (!keep.has(id)) { row.tr.remove(); campaignRows.delete(id); }
    }
  }

  function makeCampaignRow(id) {
    const tr = el('tr');
    tr.id = 'campaign-' + id;
    const name = el('td', null, 'name');
    const status = el('span');
    status.id = 'campaign-status-' + id;
    const progress = el('progress');
    progress.max = 1;
    const pct = el('span');
    const counts = el('td');
    const pause = el('button', 'Pause');
    pause.type = 'button';
    pause.id = 'pause-' + id;
    const resume = el('button', 'Resume');
    resume.type = 'button';
    resume.id = 'resume-' + id;
    pause.addEventListener('click', () => act(id, 'pause'));
    resume.addEventListener('click', () => act(id, 'resume'));
    const tdStatus = el('td');
    tdStatus.append(status);
    const tdProg = el('td', null, 'nowrap');
    tdProg.append(progress, pct);
    const tdAct = el('td', null, 'nowrap');
    tdAct.append(pause, ' ', resume);
    tr.append(el('td', id), name, tdStatus, tdProg, counts, tdAct);
    return { tr, name, status, progress, pct, counts, pause, resume };
  }

  async function act(id, action) {
    const gen = generation;
    try {
      const r = await call('POST', '/v1/campaigns/' + encodeURIComponent(id) + '/' + action);
      if (gen !== generation) return;
      if (r.status === 200 && r.body) {
        const row = campaignRows.get(id);
        if (row) {
          row.status.textContent = r.body.status;
          row.status.className = 'status-' + String(r.body.status).replace(/[^a-z]/g, '');
          row.pause.disabled = r.body.status !== 'active';
          row.resume.disabled = r.body.status !== 'paused';
        }
        setStatus('campaign ' + id + ': ' + r.body.status, false);
      } else {
        const msg = r.body && r.body.error ? r.body.error.message : 'HTTP ' + r.status;
        setStatus('campaign ' + id + ' ' + action + ' failed: ' + msg, true);
      }
    } catch (e) {
      setStatus('campaign ' + id + ' ' + action + ' failed: server unreachable', true);
    }
  }

  function renderCluster(c) {
    $('cluster').hidden = !c;
    if (!c) return;
    const r = c.rates || {};
    const t = c.totals || {};
    $('cluster-note').textContent = num(c.count) + ' live node(s); cluster: '
      + num(r.delivered || 0) + '/' + num(r.deferred || 0) + '/' + num(r.bounced || 0)
      + ' per second (delivered/deferred/bounced, last 10 s), ' + num(t.delivered || 0)
      + ' delivered since their start, ' + num(t.inflight || 0) + ' in flight.';
    fillTable($('nodes'), (c.nodes || []).map((n) => [
      n.node + (n.self ? ' (this node)' : ''), (n.ips || []).join(' ') || 'default',
      n.lease_age_s === null ? '-' : n.lease_age_s.toFixed(1),
      (n.rates || {}).delivered || 0, (n.rates || {}).deferred || 0, (n.rates || {}).bounced || 0,
      (n.totals || {}).delivered || 0, (n.totals || {}).inflight || 0,
      (n.workers || {}).alive + '/' + (n.workers || {}).count]));
  }

  function renderWorkers(w) {
    renderCluster(w.cluster);
    const table = $('workers');
    table.hidden = false;
    const rows = w.workers || [];
    $('workers-note').textContent = rows.length
      ? 'All tenants. Spool: ' + num(w.queue_depth) + ' pending.'
      : 'No workers in this process (--no-workers).';
    fillTable(table, rows.map((r) => [String(r.index), r.alive ? 'yes' : 'NO', r.restarts,
      r.connections_open, r.connections_opened, r.connections_failed, r.inflight,
      (r.ips || []).join(' ') || 'default']));
    const ips = w.source_ips || [];
    $('ips-note').textContent = 'Your mail below; all tenants: ' + (ips.length
      ? ips.map((r) => r.source_ip + ' ' + num(r.delivered) + '/' + num(r.deferred) + '/'
        + num(r.bounced)).join(', ')
      : 'nothing yet') + ' (delivered/deferred/bounced).';
  }

  // ---------------------------------------------------------------- the chart
  function renderChart(series) {
    const canvas = $('chart');
    const ratio = window.devicePixelRatio || 1;
    const w = Math.max(100, canvas.clientWidth);
    const h = Math.max(60, canvas.clientHeight);
    if (canvas.width !== Math.round(w * ratio)) canvas.width = Math.round(w * ratio);
    if (canvas.height !== Math.round(h * ratio)) canvas.height = Math.round(h * ratio);
    const g = canvas.getContext('2d');
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, w, h);
    if (!series) return;
    const n = series.delivered.length;
    let peak = 0;
    for (const k of OUTCOMES) for (const v of series[k]) peak = Math.max(peak, v);
    const top = niceMax(Math.max(1, peak));
    const left = 44;
    const pad = 8;
    const plotW = w - left - pad;
    const plotH = h - 2 * pad - 14;
    g.font = '11px system-ui, sans-serif';
    g.fillStyle = '#667085';
    g.strokeStyle = '#e3e6eb';
    g.lineWidth = 1;
    for (let i = 0; i <= 4; i++) {
      const y = pad + plotH - (plotH * i) / 4;
      g.beginPath();
      g.moveTo(left, y + 0.5);
      g.lineTo(left + plotW, y + 0.5);
      g.stroke();
      g.fillText(String(Math.round((top * i) / 4)), 4, y + 4);
    }
    g.fillText('-5 min', left, h - 4);
    g.fillText('now', left + plotW - 22, h - 4);
    for (const k of OUTCOMES) {
      g.strokeStyle = COLORS[k];
      g.lineWidth = 1.5;
      g.beginPath();
      series[k].forEach((v, i) => {
        const x = left + (plotW * i) / Math.max(1, n - 1);
        const y = pad + plotH - (plotH * v) / top;
        if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
      });
      g.stroke();
    }
    for (const k of OUTCOMES) {
      const vals = series[k];
      // the last 10 complete seconds (the current one is still filling)
      const last = vals.slice(Math.max(0, n - 11), n - 1);
      const avg = last.reduce((a, b) => a + b, 0) / Math.max(1, last.length);
      $('rate-' + k).textContent = avg.toFixed(1);
      $('sum-' + k).textContent = num(vals.reduce((a, b) => a + b, 0));
    }
    $('rate-peak').textContent = num(peak);
  }

  function niceMax(v) {
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 5, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }

  // ---------------------------------------------------------------- start
  const saved = common.savedKey();
  if (saved) start(saved); else showLogin('');
})();

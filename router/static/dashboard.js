// The pagedserve dashboard: polls /dashboard/state and draws the KV pool, the queues, the last
// step's token budget and sparklines. The API key (when the server has one) is taken from the
// URL fragment (#key=...) or asked for once, and kept for this tab only.
"use strict";

const POLL_MS = 500;
const FREE = 0, CACHED = 1, HELD = 2, SHARED = 3;
const UNLISTED = 255;
const $ = (id) => document.getElementById(id);
let key = new URLSearchParams(location.hash.slice(1)).get("key")
  || sessionStorage.getItem("pagedserve-key") || "";
let last = null;  // the latest state, for the tooltip
let cellBlocks = 1;  // blocks per drawn cell

function bytes(b64) {
  const s = atob(b64), out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

function ownerColour(owner) {
  if (owner === UNLISTED) return "hsl(0,0%,60%)";
  return `hsl(${(owner * 137.508) % 360},65%,55%)`;  // golden angle: neighbours differ
}

// The colour of one cell: the state most of its blocks are in (held blocks by their majority
// owner), so a cell of many blocks still shows who holds the pool.
function cellColour(states, owners, from, to) {
  const count = [0, 0, 0, 0];
  const held = new Map();
  for (let i = from; i < to; i++) {
    count[states[i]]++;
    if (states[i] === HELD) held.set(owners[i], (held.get(owners[i]) || 0) + 1);
  }
  const top = count.indexOf(Math.max(...count));
  if (top === FREE) return "#eef0f2";
  if (top === CACHED) return "#c8d3e0";
  if (top === SHARED) return "#222";
  let best = 0, bestN = -1;
  for (const [o, n] of held) if (n > bestN) { best = o; bestN = n; }
  return ownerColour(best);
}

function drawBlocks(state) {
  const canvas = $("blocks"), dpr = window.devicePixelRatio || 1;
  const w = Math.max(1, canvas.clientWidth), h = Math.max(1, canvas.clientHeight);
  canvas.width = w * dpr; canvas.height = h * dpr;
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  const states = bytes(state.block_states), owners = bytes(state.block_owners);
  const n = states.length;
  // Cells of at least 3x3 px: blocks beyond that many cells are aggregated.
  const maxCells = Math.floor(w / 3) * Math.floor(h / 3);
  cellBlocks = Math.max(1, Math.ceil(n / Math.max(1, maxCells)));
  const cells = Math.ceil(n / cellBlocks);
  const side = Math.max(3, Math.floor(Math.sqrt((w * h) / Math.max(1, cells))));
  const cols = Math.max(1, Math.floor(w / side));
  for (let c = 0; c < cells; c++) {
    ctx.fillStyle = cellColour(states, owners, c * cellBlocks, Math.min(n, (c + 1) * cellBlocks));
    ctx.fillRect((c % cols) * side, Math.floor(c / cols) * side, side - 1, side - 1);
  }
  const tally = [0, 0, 0, 0];
  for (let i = 0; i < n; i++) tally[states[i]]++;
  Object.assign(canvas.dataset, {free: tally[FREE], cached: tally[CACHED], held: tally[HELD],
    shared: tally[SHARED], cells, cellBlocks, side, cols});
  $("cells-note").textContent = cellBlocks > 1 ? `(${cellBlocks} blocks per cell)` : "";
  return tally;
}

function drawSpark(canvas, values, colour) {
  const ctx = canvas.getContext("2d"), w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  if (values.length < 2) return;
  const top = Math.max(...values) || 1;
  ctx.strokeStyle = colour; ctx.beginPath();
  values.forEach((v, i) => {
    const x = (i / (values.length - 1)) * (w - 2) + 1, y = h - 2 - (v / top) * (h - 4);
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
  ctx.fillStyle = "#555"; ctx.fillText(top.toFixed(top < 10 ? 1 : 0), 2, 10);
}

// Output tokens per second over the steps, in one-second bins (the last 60 s).
function tokensPerSecond(steps) {
  if (!steps.length) return [];
  const end = steps[steps.length - 1].end, bins = new Array(60).fill(0);
  for (const s of steps) {
    const age = Math.floor(end - s.end);
    if (age < 60) bins[59 - age] += s.outputs;
  }
  return bins;
}

function drawBudget(state) {
  const s = state.steps[state.steps.length - 1];
  const budget = state.token_budget || 1, bar = $("budget");
  const p = s ? s.prefill : 0, d = s ? s.decode : 0;
  bar.innerHTML = `<div style="left:0;width:${100 * p / budget}%;background:#e0a040"></div>` +
    `<div style="left:${100 * p / budget}%;width:${100 * d / budget}%;background:#4080c0"></div>`;
  Object.assign(bar.dataset, {prefill: p, decode: d, budget});
  $("budget-text").textContent = `${p} prompt + ${d} decode of ${budget} tokens` +
    (s ? `, ${s.requests} requests, ${(1000 * s.seconds).toFixed(1)} ms` : "");
}

function drawQueues(state) {
  const rows = state.requests.map((r) => {
    const done = r.output_tokens, total = Math.max(1, r.max_tokens);
    const colour = r.state === "running" ? "#4080c0" : r.state === "preempted" ? "#c04040" : "#999";
    return `<tr data-state="${r.state}"><td class="id"></td><td>${r.state}</td>` +
      `<td>${r.prompt_tokens}</td><td>${Math.max(0, r.cached_tokens)}</td>` +
      `<td>${done} / ${r.max_tokens}</td><td><div class="bar"><div style="left:0;width:` +
      `${100 * done / total}%;background:${colour}"></div></div></td><td>${r.num_blocks}</td></tr>`;
  });
  const body = $("queues").tBodies[0];
  body.innerHTML = rows.join("");
  state.requests.forEach((r, i) => { body.rows[i].cells[0].textContent = r.id; });  // no HTML
  const listed = state.requests.length, all = state.num_running + state.num_waiting;
  $("more").textContent = all > listed ? `and ${all - listed} more` : "";
}

function render(state) {
  const tally = drawBlocks(state);
  const n = state.num_blocks || 1;
  $("num-running").textContent = state.num_running;
  $("num-waiting").textContent = state.num_waiting;
  $("num-preempted").textContent = `${state.num_preempted} / ${state.num_preemptions}`;
  $("kv-usage").textContent =
    `${tally[HELD] + tally[SHARED]} / ${state.num_blocks} (${(100 * (tally[HELD] + tally[SHARED]) / n).toFixed(1)}%)`;
  $("hit-rate").textContent = `${(100 * state.prefix_cache.hit_rate).toFixed(1)}%`;
  const tps = tokensPerSecond(state.steps);
  $("tokens-per-s").textContent = tps.length ? tps[tps.length - 2] || tps[tps.length - 1] : 0;
  $("replica").textContent = state.replicas > 1 ? `replica ${state.replica} of ${state.replicas}` : "";
  drawBudget(state);
  drawSpark($("spark-tps"), tps, "#2a7");
  drawSpark($("spark-step"), state.steps.map((s) => 1000 * s.seconds), "#c60");
  drawQueues(state);
  document.body.dataset.updates = Number(document.body.dataset.updates) + 1;
}

async function poll() {
  const replica = new URLSearchParams(location.search).get("replica") || "0";
  try {
    const headers = key ? {Authorization: `Bearer ${key}`} : {};
    const resp = await fetch(`/dashboard/state?replica=${encodeURIComponent(replica)}`, {headers});
    if (resp.status === 401) {
      key = prompt("API key for this server") || "";
      sessionStorage.setItem("pagedserve-key", key);
    } else if (!resp.ok) {
      $("status").textContent = `state: HTTP ${resp.status}`;
    } else {
      last = await resp.json();
      $("status").textContent = "";
      render(last);
    }
  } catch (e) {
    $("status").textContent = `state: ${e}`;
  }
  setTimeout(poll, POLL_MS);  // after the answer: a slow server is never asked twice at once
}

$("blocks").addEventListener("mousemove", (ev) => {
  const c = $("blocks"), tip = $("tip");
  if (!last) return;
  const side = Number(c.dataset.side), cols = Number(c.dataset.cols);
  const r = c.getBoundingClientRect();
  const cell = Math.floor((ev.clientY - r.top) / side) * cols + Math.floor((ev.clientX - r.left) / side);
  const first = cell * cellBlocks;
  if (first >= last.num_blocks || (ev.clientX - r.left) / side >= cols) { tip.style.display = "none"; return; }
  const states = bytes(last.block_states), owners = bytes(last.block_owners);
  const refs = bytes(last.block_ref_counts);
  const owner = owners[first], who = owner === 0 ? "none" : owner === UNLISTED ? "(unlisted)"
    : last.requests[owner - 1].id;
  const names = ["free", "free, cached", "held", "shared"];
  tip.textContent = cellBlocks > 1
    ? `blocks ${first}-${Math.min(last.num_blocks, first + cellBlocks) - 1}`
    : `block ${first}: ${names[states[first]]}, refs ${refs[first]}, holder ${who}`;
  Object.assign(tip.style, {display: "block", left: `${ev.clientX + 12}px`, top: `${ev.clientY + 12}px`});
});
$("blocks").addEventListener("mouseleave", () => { $("tip").style.display = "none"; });
poll();

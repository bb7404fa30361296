"""``judge leaderboard``: per team its best scored submission, the history by round, as text,
JSON or one static HTML page (inline CSS and JS, no server, no CDN; sortable; per-task chart).

A team's best submission is its highest *public* score (the earliest on a tie). Until
``judge finalize`` only public scores are shown (``--private`` shows the organizer the private
part too); afterwards the private score of that same submission stands beside it.
"""
from __future__ import annotations

import html
import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from mergelab.judge.db import connect, get_state, loads, transaction
from mergelab.judge.home import Home
from mergelab.progress import TEXT_WIDTH
from mergelab.run.manifest import now_iso


@dataclass
class Board:
    tasks: list[str]
    finalized: str | None
    show_private: bool
    rows: list[dict] = field(default_factory=list)      # rank, team, submission, round, public, private, tasks
    history: dict[str, list[dict]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"tasks": self.tasks, "finalized": self.finalized, "private_shown": self.show_private,
                "rows": self.rows, "history": self.history}


def build(root: str | Path, *, private: bool = False) -> Board:
    home = Home(Path(root))
    comp = home.load()
    conn = connect(home.database)
    try:
        finalized = get_state(conn, "finalized")
        show = private or finalized is not None
        board = Board(comp.tasks, finalized, show)
        subs = conn.execute("SELECT s.id, s.team, s.seq, s.round, s.status, s.reasons, x.public_score, "
                            "x.private_score, x.tasks, x.detail FROM submissions s LEFT JOIN results x "
                            "ON x.submission = s.id ORDER BY s.seq").fetchall()
    finally:
        conn.close()
    best: dict[str, dict] = {}
    for s in subs:
        entry = {"submission": s["id"], "round": s["round"], "status": s["status"],
                 "public": s["public_score"]}
        if show:
            entry["private"] = s["private_score"]
        why = loads(s["reasons"], []) or ([s["detail"]] if s["detail"] else [])
        if why:
            entry["why"] = why[0]
        board.history.setdefault(s["team"], []).append(entry)
        if s["status"] == "scored" and s["public_score"] is not None:
            cur = best.get(s["team"])
            if cur is None or s["public_score"] > cur["public"]:
                tasks = loads(s["tasks"], {})
                best[s["team"]] = {
                    "team": s["team"], "submission": s["id"], "round": s["round"], "public": s["public_score"],
                    "private": s["private_score"] if show else None,
                    "tasks": {t: {"public": v.get("public"), **({"private": v.get("private")} if show else {})}
                              for t, v in tasks.items()}}
    key = (lambda e: -(e["private"] or 0.0)) if finalized else (lambda e: -e["public"])
    for rank, e in enumerate(sorted(best.values(), key=lambda e: (key(e), e["team"])), 1):
        board.rows.append({"rank": rank, **e})
    return board


def finalize(root: str | Path) -> str:
    """Mark the season final: the leaderboard shows (and ranks by) the private scores."""
    home = Home(Path(root))
    conn = connect(home.database)
    try:
        with transaction(conn):
            when = get_state(conn, "finalized")
            if when is None:
                when = now_iso()
                conn.execute("INSERT INTO state (key, value) VALUES ('finalized', ?)", (when,))
        return when
    finally:
        conn.close()


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def blocks(head: list[str], rows: list[list[str]], key: int, width: int = TEXT_WIDTH) -> list[list[str]]:
    """Columns laid out in blocks of at most ``width`` characters, each line ``rstrip``-ed.

    The first block holds as many columns as fit; each further block repeats the first ``key``
    columns (what names a row) and takes the next columns that fit, so a wide table wraps by
    columns and no cell is cut. A column wider than a block on its own gets a block of its own.
    """
    cols = [[h, *(r[i] for r in rows)] for i, h in enumerate(head)]
    widths = [max(len(c) for c in col) for col in cols]

    def line(idx: list[int]) -> int:
        return sum(widths[i] for i in idx) + 2 * (len(idx) - 1)

    out, idx, i = [], [], 0
    while i < len(cols):
        if idx and line(idx + [i]) > width and len(idx) > key:
            out.append(idx)
            idx = list(range(key))
            continue
        idx.append(i)
        i += 1
    out.append(idx)
    return [["  ".join(cols[c][r].ljust(widths[c]) for c in b).rstrip() for r in range(len(cols[0]))] for b in out]


def text(board: Board, width: int = TEXT_WIDTH) -> str:
    """A plain-text table of at most ``width`` columns (the task columns wrap into further
    blocks that repeat rank and team), plus the history by round, wrapped likewise.

    The layout does not depend on the terminal: team names, submission ids and scores are never
    cut; only a long rejection reason in the history is shortened (to three lines).
    """
    head = ["rank", "team", "submission", "round", "public"] + (["private"] if board.show_private else [])
    head += list(board.tasks)
    lines = []
    for r in board.rows:
        cells = [str(r["rank"]), r["team"], r["submission"][:12], str(r["round"]), fmt(r["public"])]
        if board.show_private:
            cells.append(fmt(r["private"]))
        cells += [fmt(r["tasks"].get(t, {}).get("public")) for t in board.tasks]
        lines.append(cells)
    title = "leaderboard (final: private scores)" if board.finalized else (
        "leaderboard (public part; private shown to the organizer)" if board.show_private else
        "leaderboard (public part)")
    out = [title]
    for n, block in enumerate(blocks(head, lines, key=2, width=width)):
        out += ([""] if n else []) + block
    if board.tasks:
        out += ["", "the task columns: each task's public score"]
    out.append("")
    out.append("history by round")
    for team in sorted(board.history):
        for e in board.history[team]:
            extra = f"  private {fmt(e.get('private'))}" if board.show_private else ""
            why = f"  ({e['why']})" if e.get("why") else ""
            line = (f"{team}  round {e['round'] if e['round'] is not None else '-'}  {e['submission'][:12]}  "
                    f"{e['status']}  public {fmt(e['public'])}{extra}{why}")
            out += textwrap.wrap(line, width, initial_indent="  ", subsequent_indent="      ", max_lines=4,
                                 placeholder=" …)", break_on_hyphens=False)
    return "\n".join(out) + "\n"


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Leaderboard</title>
<style>
body{font:14px system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3;cursor:pointer;user-select:none}
td.t,th.t{text-align:left}
.bar{fill:#4a7bd0}.bar.p{fill:#d07a4a}
.note{color:#666}
</style></head><body>
<h1>Leaderboard</h1>
<p class="note" id="mode">__MODE__</p>
<table id="board"><thead><tr id="head"></tr></thead><tbody id="rows"></tbody></table>
<h2>Per task</h2>
<div id="chart"></div>
<h2>History by round</h2>
<table id="history"><thead><tr><th class="t">team</th><th>round</th><th class="t">submission</th>
<th class="t">status</th><th>public</th></tr></thead><tbody id="hist"></tbody></table>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const cols = [["rank","rank"],["team","team"],["submission","submission"],["round","round"],["public","public"]];
if (D.private_shown) cols.push(["private","private"]);
for (const t of D.tasks) cols.push(["task:"+t, t+" (public)"]);
function val(r, k){ if (k.startsWith("task:")) { const t=r.tasks[k.slice(5)]; return t?t.public:null; } return r[k]; }
function show(v, k){ return v===null||v===undefined ? "-" : (typeof v==="number" && k!=="rank" && k!=="round" ? v.toFixed(4) : String(v)); }
let sortKey = "rank", asc = true;
function render(){
  const head = document.getElementById("head"); head.textContent = "";
  for (const [k,label] of cols){ const th=document.createElement("th"); th.textContent=label+(k===sortKey?(asc?" \\u25b2":" \\u25bc"):"");
    th.dataset.key=k; if(k==="team"||k==="submission") th.className="t"; th.onclick=()=>{ if(sortKey===k) asc=!asc; else {sortKey=k; asc=(k==="rank"||k==="team");} render(); }; head.appendChild(th); }
  const rows = D.rows.slice().sort((a,b)=>{ let x=val(a,sortKey), y=val(b,sortKey);
    if(x===y) return a.rank-b.rank; if(x===null) return 1; if(y===null) return -1; return (x<y?-1:1)*(asc?1:-1); });
  const body = document.getElementById("rows"); body.textContent = "";
  for (const r of rows){ const tr=document.createElement("tr"); tr.className="row";
    for (const [k] of cols){ const td=document.createElement("td"); let v=val(r,k); if(k==="submission") v=v.slice(0,12);
      td.textContent=show(v,k); if(k==="team"||k==="submission") td.className="t"; tr.appendChild(td); } body.appendChild(tr); }
}
function chart(){
  const W=560, bh=14, gap=6, left=140, ns="http://www.w3.org/2000/svg", box=document.getElementById("chart");
  for (const t of D.tasks){ const h=document.createElement("h3"); h.textContent=t; box.appendChild(h);
    const svg=document.createElementNS(ns,"svg"); const per = D.private_shown?2:1;
    svg.setAttribute("width",W); svg.setAttribute("height",D.rows.length*(per*bh+gap)+4); svg.setAttribute("class","taskchart");
    D.rows.forEach((r,i)=>{ const y=i*(per*bh+gap); const lab=document.createElementNS(ns,"text");
      lab.setAttribute("x",0); lab.setAttribute("y",y+bh-3); lab.textContent=r.team; svg.appendChild(lab);
      const vals=[["public",(r.tasks[t]||{}).public]]; if(D.private_shown) vals.push(["private",(r.tasks[t]||{}).private]);
      vals.forEach(([part,v],j)=>{ const rect=document.createElementNS(ns,"rect"); rect.setAttribute("x",left); rect.setAttribute("y",y+j*bh);
        rect.setAttribute("width",Math.max(0,(v||0)*(W-left-60))); rect.setAttribute("height",bh-2);
        rect.setAttribute("class","bar"+(part==="private"?" p":"")); rect.setAttribute("data-team",r.team); rect.setAttribute("data-value",v===null||v===undefined?"":v.toFixed(4));
        svg.appendChild(rect); const tx=document.createElementNS(ns,"text"); tx.setAttribute("x",left+Math.max(0,(v||0)*(W-left-60))+4);
        tx.setAttribute("y",y+j*bh+bh-3); tx.textContent=show(v,"score")+(part==="private"?" (private)":""); svg.appendChild(tx); }); });
    box.appendChild(svg); }
}
function history(){ const body=document.getElementById("hist");
  for (const team of Object.keys(D.history).sort()) for (const e of D.history[team]){ const tr=document.createElement("tr");
    for (const [v,c] of [[team,"t"],[e.round===null?"-":e.round,""],[e.submission.slice(0,12),"t"],[e.status,"t"],[show(e.public,"public"),""]]){
      const td=document.createElement("td"); td.textContent=String(v); if(c) td.className=c; tr.appendChild(td);} body.appendChild(tr);} }
const m = /sort=([^&]+)/.exec(location.hash); if (m){ sortKey=decodeURIComponent(m[1]); asc=/dir=asc/.test(location.hash) || (!/dir=desc/.test(location.hash) && (sortKey==="rank"||sortKey==="team")); }
render(); chart(); history();
document.body.dataset.rendered = "yes";
</script></body></html>
"""


def html_page(board: Board) -> str:
    mode = ("Final: private scores beside the public ones." if board.finalized else
            "Public part of the hidden set." + (" Private part shown to the organizer." if board.show_private else ""))
    data = json.dumps(board.to_dict()).replace("</", "<\\/")
    return _PAGE.replace("__MODE__", html.escape(mode)).replace("__DATA__", data)

"""The diagnosis as a report: terminal text, Markdown or HTML (with PNG plots).

Sections follow the source's layers of cause: the **semantic** layer (what a logprob
means: the engine's logprob mode, the trainer's deliberate semantics), the
**inference path** (how the engine computed it: runtime defaults, weight updates,
head dtype), the **objective** (what the trainer computed), and **policy lag**
(legitimate, no fix removes it), each with its size, evidence and verdict.
"""
from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any

from replay.output import table
from replay.diagnose.backend import FIX_LAYER as LAYER_OF

FIX_WHAT = {
    "processed_logprobs": "the engine reports logprobs of the raw logits, not of the distribution it samples "
                          "from (temperature, top-k, top-p)",
    "v0_runtime_defaults": "prefix caching and async scheduling: stale KV of cached prefixes after an update, "
                           "a new version reaching in-flight requests a step late",
    "paused_weight_update": "an update loads while generation goes on: under async scheduling the step in flight computes with the old weights",
    "fp32_lm_head": "the final projection runs in bf16",
}


def _g(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def _steps(steps: list[int]) -> str:
    from replay.rerun.plans import step_ranges

    return step_ranges(steps) or "none"


def _yes(x: Any) -> str:
    return {True: "yes", False: "no", None: "—"}[x]


def sections(res: dict) -> list[tuple[str, list[str | tuple[list[str], list[list[Any]]]]]]:
    """The report as (title, blocks); a block is a line of text or a (columns, rows) table."""
    comp, back, tr, fl = res["components"], res["backend"], res["trainer"], res["floors"]
    head: list = [f"verdict: {res['verdict']} — {res['summary']}",
                  f"steps {_steps(res['steps'])} ({comp['n_tokens']} tokens)",
                  f"floor: {fl['backend']['dtype']} body ({fl['backend']['source']}), mean {_g(fl['backend']['mean'])} "
                  f"nats/token over {fl['backend']['n']} sampled tokens; a component whose mean |.| stays under "
                  f"{_g(comp['backend']['test']['bound'])} cannot be told from the body's numerics",
                  f"onset: {'step ' + str(res['onset_step']) if res['onset_step'] is not None else 'none'} "
                  "(the first step a component leaves the floor: CUSUM over per-step z)"]
    if res.get("against"):
        a = res["against"]
        head.append(f"against {a['path']}: the run departs at step {a['onset_step']} (run-vs-run CUSUM); "
                    f"{'agrees' if a['agrees'] else 'differs'}")
    head += [f"note: {n}" for n in res.get("notes", [])]
    head += [f"not tested: {side}" for side in res.get("untested", [])]
    head.append("")
    head.append(f"r = lp_trainer - lp_rollout: mean {_g(comp['r']['mean'])}, mean |r| {_g(comp['r']['mean_abs'])}"
                "   (r = e_trainer + lag + semantics - e_backend, per token)")
    rows = []
    for name, label in (("backend", "backend error"), ("semantics", "trainer semantics"), ("lag", "policy lag"),
                        ("trainer", "trainer error")):
        c = comp[name]
        rows.append([label, c["mean"], c["mean_abs"], _yes(c.get("at_floor")) if "at_floor" in c else "(not tested)"])
    head.append((["component", "mean", "mean |.|", "at floor"], rows))
    out = [("diagnosis", head)]

    sem: list = []
    if back.get("fixes") and "processed_logprobs" in back["fixes"]:
        sem.append(f"backend: processed_logprobs needed — {FIX_WHAT['processed_logprobs']}")
    elif "processed_logprobs" in back.get("already_applied", []):
        sem.append("backend: processed logprobs already on")
    else:
        sem.append("backend: no semantic fix needed")
    s = tr.get("semantics") or {}
    if s:
        sem.append(f"trainer semantics: {s['name']} — {s['description']}; size: mean {_g(s.get('mean'))} nats/token")
    out.append(("semantic layer", sem))

    inf: list = []
    if not back["off_floor"]:
        inf.append("backend error at the floor: nothing to fix on the inference path")
    else:
        at = back["onset_step"] if back.get("onset_step") is not None else back.get("first_off_floor")
        inf.append(f"backend error leaves the floor at step {at}; "
                   f"replayed steps {_steps(back.get('window') or [])}")
        if back.get("already_applied"):
            inf.append(f"already applied in the recorded config: {', '.join(back['already_applied'])}")
        f = back.get("fidelity")
        if f:
            inf.append("fidelity: the replay under the recorded config "
                       + ("reproduces the recording exactly" if f.get("exact") else
                          (f"reproduces the recording at the floor (mean |Δ| {_g(f['mean_abs_diff'])})"
                           if f["at_floor"] else f"does NOT reproduce the recording (mean |Δ| {_g(f['mean_abs_diff'])}, "
                                                 f"{f['exceed']}/{f['n_tokens']} tokens over the tail bound)"))
                       + f" on {f['n_tokens']} tokens")
        for fix in back.get("fixes") or []:
            if LAYER_OF[fix] == "inference path":
                inf.append(f"needed: {fix} — {FIX_WHAT[fix]}")
        inf += unneeded_lines(back, res["floors"]["backend"]["dtype"])
        if back.get("explained") is False or back.get("reason"):
            inf.append(f"NOT EXPLAINED: {back.get('reason')}")
            r = back.get("residual")
            if r:
                inf.append(f"residual with every lacking fix: mean |lp_replay - lp_ref| {_g(r['mean_abs'])} "
                           f"(floor bound {_g(r['bound'])}), {r['exceed']}/{r['n']} tokens over the tail bound")
        if back.get("ablation"):
            cols = ["replayed with", "mean |lp_replay - lp_ref|", "tokens over", "mismatch", "at floor"]
            inf.append((cols, [[a["label"], a["mean_abs_residual"], a["exceed"], a["direction"] or "",
                                _yes(a["at_floor"])] for a in back["ablation"]]))
        if back.get("worst"):
            inf.append("worst tokens of the residual:")
            inf.append((["step", "request", "pos", "value", "version", "cached"],
                        [[w["step"], w["request_id"], w["pos"], w["value"], w["version"], w["num_cached_tokens"]]
                         for w in back["worst"][:8]]))
    out.append(("inference path", inf))

    obj: list = []
    if tr.get("explained") is None:
        obj.append(tr.get("reason", "no trainer rows"))
    else:
        r = tr.get("residual") or {}
        obj.append(f"trainer error (e_trainer): mean |.| {_g(r.get('mean_abs'))} against a bound of {_g(r.get('bound'))}"
                   f" ({res['floors']['trainer']['dtype']} floor); "
                   + ("at the floor" if r.get("at_floor") else "ABOVE the floor")
                   + (f", from step {tr['onset_step']}" if tr.get("onset_step") is not None else ""))
        rec = tr.get("on_record") or {}
        if rec.get("older_than_tokens"):
            obj.append(f"on the record: the trainer's version is older than the version that generated "
                       f"{rec['older_than_tokens']} tokens (stale_version)")
        if rec.get("rows_of_other_length"):
            ex = rec["example"]
            obj.append(f"on the record: {rec['rows_of_other_length']} trainer rows have another length than their "
                       f"rollout (e.g. step {ex['step']} {ex['request_id']}: {ex['values']} values for {ex['tokens']} tokens)")
        if tr.get("hypotheses"):
            obj.append((["hypothesis", "residual mean |.|", "tokens over", "at floor", "estimate"],
                        [[h["id"], h["mean_abs_residual"], h["exceed"], _yes(h["at_floor"]),
                          ", ".join(f"{k}={v}" for k, v in h["detail"].items())] for h in tr["hypotheses"]]))
        if tr.get("causes"):
            obj.append(f"named: {', '.join(tr['causes'])}")
        elif tr.get("explained") is False:
            obj.append(f"NOT EXPLAINED: {tr.get('reason')}")
        else:
            obj.append("no objective-side cause")
    out.append(("objective", obj))

    lag = comp["lag"]
    out.append(("policy lag", [f"mean lag {_g(lag['mean'])}, mean |lag| {_g(lag['mean_abs'])} nats/token; "
                               f"{lag['tokens_with_lag']} tokens scored by a trainer version other than theirs. "
                               "Legitimate in an asynchronous pipeline: no fix removes it."]))
    if res.get("tokens"):
        t = res["tokens"]
        cols = ["step", "request", "pos", "token", t[0]["component"], "lp_rollout", "lp_ref", "version",
                "boundary", "after", "cached", "lag"]
        out.append((f"tokens ranked by |{t[0]['component']}|", [(cols, [
            [x["step"], x["request_id"], x["pos"], x["token_id"], x["value"], x["lp_rollout"], x["lp_ref"],
             x["version"], x["version_boundary"], _yes(x["after_boundary"]), x["num_cached_tokens"], x["lag"]]
            for x in t])]))
    if res.get("layer"):
        ly = res["layer"]
        blocks: list = [f"first differing point for {ly.get('request_id')}[{ly.get('pos')}] at step {ly.get('step')}: "
                        f"{ly.get('layer') or 'none'}" + (f" ({ly['error']})" if ly.get("error") else "")]
        if ly.get("note"):
            blocks.append(ly["note"])
        out.append(("layer", blocks))
    return out


def render_text(res: dict) -> str:
    lines: list[str] = []
    for title, blocks in sections(res):
        if title != "diagnosis":
            lines += ["", f"── {title} " + "─" * max(0, 60 - len(title))]
        for b in blocks:
            lines.append(b if isinstance(b, str) else table(*b).rsplit("\n", 1)[0])
    return "\n".join(lines)


def _md_table(cols: list[str], rows: list[list[Any]]) -> str:
    def c(v: Any) -> str:
        return (f"{v:.4g}" if isinstance(v, float) else str(v if v is not None else "—")).replace("|", "\\|")

    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                     + ["| " + " | ".join(c(v) for v in r) + " |" for r in rows])


def plots(res: dict, stem: Path) -> list[Path]:
    """Components per step (with the floor's bound) and the worst tokens, as PNGs beside ``stem``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    rows = res["per_step"]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for name, label in (("backend", "|backend error|"), ("semantics", "|semantics|"), ("lag", "|lag|"),
                        ("trainer", "|trainer error|")):
        ax.plot(steps, [max(r[f"{name}_mean_abs"], 1e-9) if r[f"{name}_mean_abs"] == r[f"{name}_mean_abs"]
                        else math.nan for r in rows], marker="o", ms=3, label=label)
    bound = res["components"]["backend"]["test"]["bound"]
    ax.axhline(bound, color="grey", ls="--", lw=1, label="floor bound")
    if res.get("onset_step") is not None:
        ax.axvline(res["onset_step"], color="red", lw=1, alpha=0.6, label="onset")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("mean |.| (nats/token)")
    ax.set_title(f"components per step — verdict: {res['verdict']}")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=6)
    fig.tight_layout()
    p = stem.with_name(stem.name + "-components.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out.append(p)
    if res.get("tokens"):
        t = res["tokens"]
        fig, ax = plt.subplots(figsize=(8, 3.2))
        vals = [x["value"] if math.isfinite(x["value"]) else 0.0 for x in t]
        ax.bar(range(len(t)), vals, color=["tab:red" if x["after_boundary"] else "tab:blue" for x in t])
        ax.set_xticks(range(len(t)), [f"s{x['step']} {x['request_id']}[{x['pos']}]" for x in t], rotation=60,
                      fontsize=6, ha="right")
        ax.set_ylabel(t[0]["component"] + " (nats)")
        ax.set_title(f"tokens ranked by |{t[0]['component']}| (red: at or after a version boundary)")
        fig.tight_layout()
        p = stem.with_name(stem.name + "-tokens.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        out.append(p)
    return out


def write_report(res: dict, path: str | Path) -> list[Path]:
    """Write the report to ``path`` (``.md`` or ``.html``) with its PNG plots; returns the files."""
    from replay.errors import BadInput

    path = Path(path)
    kind = path.suffix.lower()
    if kind not in (".md", ".html", ".htm"):
        raise BadInput(f"--report writes .md or .html, not {path.name!r}", field="report")
    path.parent.mkdir(parents=True, exist_ok=True)
    pngs = plots(res, path.with_suffix(""))
    if kind == ".md":
        parts = [f"# Diagnosis of `{res['path']}`", ""]
        for title, blocks in sections(res):
            if title != "diagnosis":
                parts += ["", f"## {title}", ""]
            for b in blocks:
                parts.append(b if isinstance(b, str) else "\n" + _md_table(*b) + "\n")
        parts += [""] + [f"![{p.stem}]({p.name})" for p in pngs]
        path.write_text("\n".join(parts) + "\n")
    else:
        import html

        parts = [f"<!doctype html><meta charset=utf-8><title>Diagnosis of {html.escape(res['path'])}</title>",
                 "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
                 "td,th{border:1px solid #ccc;padding:2px 6px;font-size:90%}</style>",
                 f"<h1>Diagnosis of <code>{html.escape(res['path'])}</code></h1>"]
        for title, blocks in sections(res):
            if title != "diagnosis":
                parts.append(f"<h2>{html.escape(title)}</h2>")
            for b in blocks:
                if isinstance(b, str):
                    parts.append(f"<p>{html.escape(b)}</p>")
                else:
                    cols, rows = b
                    parts.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"
                                 + "".join("<tr>" + "".join(f"<td>{html.escape(_g(v, '.4g'))}</td>" for v in r)
                                           + "</tr>" for r in rows) + "</table>")
        for p in pngs:
            data = base64.b64encode(p.read_bytes()).decode()
            parts.append(f'<p><img alt="{p.stem}" src="data:image/png;base64,{data}"></p>')
        path.write_text("\n".join(parts) + "\n")
    return [path, *pngs]


def unneeded_lines(back: dict, dtype: str | None = None) -> list[str]:
    """What the search says about the lacking fixes it did not name: within the floor,
    covered by the named ones, or able to stand in for one of them."""
    out = []
    if back.get("within_floor"):
        body = f"of a {dtype} body " if dtype else ""
        out.append(f"also lacking, but their effect on these steps is within the floor {body}"
                   f"(not resolved at this precision): {', '.join(back['within_floor'])}")
    for fix in back.get("covered") or []:
        out.append(f"also lacking, and it changes these steps, but the fixes named remove what it changes: {fix}")
    for alt in back.get("alternatives") or []:
        out.append(f"alternatively: {alt['fix']} in place of {alt['replaces']} also reaches the floor "
                   f"({' + '.join(alt['fixes'])})")
    return out

"""`vlp data filter --engine ray`: the filter's rules as Ray Data steps, for pools one machine cannot hold.

    ray start --head --port 6379 ...; ray start --address HEAD:6379 ...   # or an existing cluster
    vlp data filter --engine ray --address HEAD:6379 --embeddings pool_emb --out pool_filter ...

The state is a Dataset of the pool's small columns (~200 B a row: pool position, shard, key, caption, sizes,
hash, score, reason), materialised in the object store after each rule (spilled to disk when it is full);
embeddings are read only by SemDeDup, per shard table. Each rule runs as `vlp.curate.ray_rules` describes,
on what the earlier ones kept, then alone on every valid row, as the single-process filter counts. The driver
holds only what a rule's answer needs (histograms, k-means' sample, the rows SemDeDup removes, MetaCLIP's
matched rows) and streams decisions.tsv in pool order. The outputs are the single-process filter's, with the
same decisions; they are written atomically at the end, so a run that fails leaves the previous ones.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from vlp.curate import ray_rules as RR
from vlp.curate.report import Summary, score_edges
from vlp.curate.store import CurateError, atomic_write, complete_tables, order_key

SMALL = ["row", "shard", "key", "caption", "width", "height", "image_hash", "valid", "score"]


def connect(address, cpus=None):
    """Join the cluster at `address` (host:port, or "auto"), or start a local Ray when None."""
    import logging

    import ray
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    logging.getLogger("ray.data").setLevel(logging.ERROR)   # vlp prints one line per step instead

    try:
        if address:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        else:
            ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise CurateError(f"cannot reach the Ray cluster at {address}: {str(e).splitlines()[0]}") from None
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    # groupby/sort by tasks (retried when a node is lost), not hash-shuffle actors that hold CPUs for a run
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    ctx.print_on_execution_start = False


def read_state(files: list[Path]):
    import ray

    def prep(b):
        table = np.array([int(Path(p).stem) for p in b.pop("path")], dtype=np.int64)
        b["order"] = order_key(table, b.pop("row"))
        b["reason"] = np.where(b["valid"], "", "unreadable").astype(object)
        return b
    return ray.data.read_parquet([str(p) for p in files], columns=SMALL, include_paths=True) \
        .map_batches(prep, batch_format="numpy")


def step(ds, name: str, params: dict, rule, ctx: dict):
    """`ds` with `hit`: the rows of `alive` that rule `name` removes."""
    from vlp.curate.balance import read_entries

    if name in ("caption_words", "image_size") or (name == "clip_score" and params["min"] is not None):
        return RR.per_sample(ds, rule)
    if name in ("caption_repeats", "exact_image", "exact_pair"):
        key = {"caption_repeats": RR.caption_key, "exact_image": RR.image_key, "exact_pair": RR.pair_key}[name]
        return RR.partitioned(ds, rule, key, ctx["n"])
    if name == "clip_score":
        return RR.top_fraction(ds, params["top_fraction"])
    if name == "semdedup":
        return RR.semdedup(ds, ctx["files"], params["eps"], params["clusters"], ctx["seed"], ctx["n"], ctx["log"])
    if name == "balance":
        return RR.balance(ds, read_entries(params["entries"]), params["t"], ctx["seed"])
    raise ValueError(f"no Ray step for rule {name}")


def _alive(state, alone: bool):
    return state.map_batches(lambda b: {**b, "alive": b["valid"] if alone else b["reason"] == ""},
                             batch_format="numpy")


def run_rules(state, rules, ctx: dict):
    """-> (state with each row's reason, counts as `vlp.curate.filter.run_rules` gives them)."""
    invalid = int(RR.tally(state, lambda b: (~b["valid"]).sum())[0])
    counts = [{"rule": "unreadable", "params": {}, "removed": invalid, "alone": invalid}]
    so_far = 0
    for name, params, rule in rules:
        t0 = time.perf_counter()

        def mark(b, name=name):
            reason = np.where(b.pop("hit"), name, b["reason"]).astype(object)
            return {**{k: v for k, v in b.items() if k != "alive"}, "reason": reason}
        state = step(_alive(state, False), name, params, rule, ctx).map_batches(mark, batch_format="numpy")
        state = state.materialize()
        removed = int(RR.tally(state, lambda b, name=name: (b["reason"] == name).sum())[0])
        alone = removed if so_far == 0 else \
            int(RR.tally(step(_alive(state, True), name, params, rule, ctx), lambda b: b["hit"].sum())[0])
        so_far += removed
        counts.append({"rule": name, "params": params, "removed": removed, "alone": alone})
        ctx["log"](f"[ray] {name}: removed {removed} (alone {alone}) in {time.perf_counter() - t0:.1f} s")
    return state, counts


def write_decisions(path: Path, state) -> None:
    rows = state.select_columns(["order", "shard", "key", "reason"]).sort("order")

    def write(f):
        f.write(b"shard\tkey\treason\n")
        for b in rows.iter_batches(batch_format="numpy", batch_size=65536):
            f.write("".join(f"{s}\t{k}\t{r}\n" for s, k, r in zip(b["shard"], b["key"], b["reason"]))
                    .encode("utf-8"))
    atomic_write(path, write)


def summarise(state, counts: list[dict], n: int, per_rule: int, seed: int) -> Summary:
    """The report's figures from per-block sums (as `vlp.curate.report.summarise` computes them whole)."""
    def sums(b):
        ok = b["valid"] & np.isfinite(b["score"])
        kept = ok & (b["reason"] == "")
        s = b["score"].astype(np.float64)
        return [s[ok].sum(), ok.sum(), s[kept].sum(), kept.sum(), (b["reason"] == "").sum()]
    v = RR.tally(state, sums)
    out = Summary(n, int(v[4]), counts, (float(v[0]), int(v[1]), float(v[2]), int(v[3])))
    if v[1]:
        ends = RR.tally(state, lambda b: _ends(b["score"][b["valid"] & np.isfinite(b["score"])]), np.minimum)
        edges = score_edges(float(ends[0]), float(-ends[1]))

        def hist(b):
            ok = b["valid"] & np.isfinite(b["score"])
            return np.stack([np.histogram(b["score"][ok], edges)[0],
                             np.histogram(b["score"][ok & (b["reason"] == "")], edges)[0]])
        h = RR.tally(state, hist).astype(np.int64)
        out.hist = (edges, h[0], h[1])
    out.picks = _picks(state, per_rule, seed)
    return out


def _ends(x: np.ndarray) -> list:
    return [x.min(), -x.max()] if len(x) else [np.inf, np.inf]


def _picks(state, per_rule: int, seed: int) -> dict:
    from vlp.curate.dedup import mix64

    def best(b):
        gone = np.flatnonzero(b["reason"] != "")
        h = mix64(b["order"][gone], seed)
        keep = []
        for r in set(b["reason"][gone].tolist()):
            rows = np.flatnonzero(b["reason"][gone] == r)
            keep.extend(gone[rows[np.lexsort((b["order"][gone][rows], h[rows]))][:per_rule]])
        keep = np.array(sorted(keep), dtype=np.int64)
        return {k: b[k][keep] for k in ("order", "reason", "shard", "key", "score", "caption")}
    c = {k: np.concatenate(v) for k, v in RR._columns(state.map_batches(best, batch_format="numpy")).items()}
    if not c:
        return {}
    from vlp.curate.report import pick_rows

    return {r: [{"shard": str(c["shard"][i]), "key": str(c["key"][i]), "score": float(c["score"][i]),
                 "caption": str(c["caption"][i])} for i in rows]
            for r, rows in pick_rows(c["order"], c["reason"], per_rule, seed).items()}


def filter_on_ray(embeddings: str, out: Path, rules, *, address=None, seed: int = 0, per_rule: int = 24,
                  log=print) -> Summary:
    """Run `rules` on Ray over `embeddings`' Parquet tables; write out/decisions.tsv; -> the report's Summary."""
    import ray

    files = complete_tables(embeddings)
    if any(p.suffix != ".parquet" for p in files):
        raise CurateError(f"{embeddings} holds .npz tables: `vlp data convert-tables --embeddings {embeddings}` "
                          f"rewrites them as the Parquet tables --engine ray reads")
    connect(address)
    try:
        state = read_state(files).materialize()
        n = state.count()
        log(f"[ray] {n} samples in {len(files)} tables on {len(ray.nodes())} nodes")
        state, counts = run_rules(state, rules, {"n": n, "files": files, "seed": seed, "log": log})
        out.mkdir(parents=True, exist_ok=True)
        summary = summarise(state, counts, n, per_rule, seed)
        write_decisions(out / "decisions.tsv", state)
        return summary
    except ray.exceptions.RayError as e:
        raise CurateError(f"the Ray run failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}); "
                          f"{out} keeps its earlier output") from None
    finally:
        ray.shutdown()

"""A markdown report of a finished or partial run: `jaxpoison report DIR`.

Reads what a run leaves in its workdir (any experiment):

- rows: `DIR/results.jsonl` when the run finished; otherwise the finished chunks
  of every sweep under DIR (`*/chunks/NNNNN.jsonl`, next to a `sweep.json` that
  says how many trials the sweep has), so a run that is still going, or was
  killed, is reported as far as it got;
- `summary.json` (shown as is) and every `*.png` figure (linked).

Rows are grouped by the experiment's natural keys, found from the rows alone:
scalar fields with a few distinct values that split the trials evenly (e.g.
`n_poisons`, `task`, `opacity`); ids, seeds and predictions have too many values
or split unevenly and are left out (`--by` names the keys instead). Per group,
every boolean field becomes a rate with its 95% Wilson interval (Wilson 1927) and
every float field a mean. Rows holding a list of dicts (one trial, several
settings) are flattened to one row per setting first.

Writes `DIR/report.md` (atomically) and prints its path.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from absl import flags

from jaxpoison.errors import UserInputError
from jaxpoison.results import atomic_write_text, read_jsonl, wilson_interval
from jaxpoison.summaries import group_rows

MAX_LEVELS = 12  # a natural key has at most this many distinct values ...
MAX_GROUPS = 24  # ... and all keys together at most this many groups
MAX_IMBALANCE = 2.0  # largest over smallest group size of a natural key
MAX_FLOAT_LEVELS = 4  # float settings (opacity, eps) take few values
MIN_GROUP_ROWS = 3  # fewer rows per group make a rate meaningless


def flatten(rows: Sequence[dict]) -> list[dict]:
    """One row per setting: a field holding a list of dicts expands the row."""
    out = []
    for row in rows:
        nested = [k for k, v in row.items() if _is_list_of_dicts(v)]
        if not nested:
            out.append(row)
            continue
        key = nested[0]
        parent = {k: v for k, v in row.items() if k != key}
        out.extend(flatten([{**parent, **child} for child in row[key]]))
    return out


def _is_list_of_dicts(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _is_scalar(v: Any) -> bool:
    return isinstance(v, bool | int | float | str) and v is not None


def _is_bool_field(rows: Sequence[dict], key: str) -> bool:
    return all(isinstance(r.get(key), bool) for r in rows if key in r)


def _is_numeric_field(rows: Sequence[dict], key: str) -> bool:
    return all(
        isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool)
        for r in rows
        if key in r
    )


def _float_setting(counts: Counter) -> bool:
    """Few round values (0.2, 0.3; not 8/255 as measured from 8-bit pixels)."""
    return len(counts) <= MAX_FLOAT_LEVELS and all(
        abs(v * 1000 - round(v * 1000)) < 1e-6 for v in counts
    )


def summary_hints(summary: Any) -> set[str]:
    """Field names a summary groups by: its `by_<name>` keys and `name=value` keys
    (e.g. quickstart's `by_n_poisons`, frogs_oneshot's `ten_class/per_class=25`)."""
    found: set[str] = set()
    if isinstance(summary, dict):
        for key, value in summary.items():
            if isinstance(key, str):
                if key.startswith("by_"):
                    found.add(key[3:])
                for part in re.split(r"[/,]", key):
                    if "=" in part:
                        found.add(part.split("=", 1)[0])
            found |= summary_hints(value)
    elif isinstance(summary, list):
        for value in summary:
            found |= summary_hints(value)
    return found


def natural_keys(rows: Sequence[dict], prefer: Iterable[str] = ()) -> list[str]:
    """The fields to group by: few values, each on about as many rows as the rest.

    Candidates are non-boolean scalar fields present in every row with 2 to
    MAX_LEVELS distinct values whose largest level has at most MAX_IMBALANCE
    times the rows of its smallest (designed factors are tiled evenly; labels and
    predictions are not); float fields only with at most MAX_FLOAT_LEVELS round
    values (an opacity), after the others, unless preferred. They are added,
    those in `prefer` (a summary's grouping, `summary_hints`) first, then fewest
    levels and most even first, while the number of groups stays within
    MAX_GROUPS, every group keeps at least MIN_GROUP_ROWS rows, and the key splits
    some group.
    """
    if not rows:
        return []
    fields = set.intersection(*(set(r) for r in rows))
    prefer = set(prefer)
    candidates = []
    for key in sorted(fields):
        values = [r[key] for r in rows]
        if not all(_is_scalar(v) for v in values) or _is_bool_field(rows, key):
            continue
        counts = Counter(values)
        if not 2 <= len(counts) <= MAX_LEVELS:
            continue
        is_float = any(isinstance(v, float) for v in values)
        if is_float and key not in prefer and not _float_setting(counts):
            continue  # a measured quantity, not a setting
        imbalance = max(counts.values()) / min(counts.values())
        if imbalance <= MAX_IMBALANCE:
            candidates.append(
                (key not in prefer, is_float, len(counts), imbalance, key)
            )
    keys: list[str] = []
    groups = 1
    for *_, key in sorted(candidates):
        sizes = Counter(tuple(r[k] for k in [*keys, key]) for r in rows)
        if groups < len(sizes) <= MAX_GROUPS and min(sizes.values()) >= MIN_GROUP_ROWS:
            keys, groups = [*keys, key], len(sizes)
    return keys


def _metric_fields(rows: Sequence[dict], by: Sequence[str]) -> tuple[list, list]:
    """(boolean fields, float fields) other than the group keys.

    Integer fields (class labels, indices, seeds, counts) get no mean: the mean
    of a label means nothing; group by them with `--by` instead.
    """
    fields = sorted({k for r in rows for k, v in r.items() if _is_scalar(v)})
    fields = [k for k in fields if k not in by]
    rates = [k for k in fields if _is_bool_field(rows, k)]
    means = [
        k
        for k in fields
        if k not in rates
        and _is_numeric_field(rows, k)
        and any(isinstance(r.get(k), float) for r in rows)
    ]
    return rates, means


def format_rate(flags: Sequence[bool]) -> str:
    """`k/n = rate% [low, high]` with the 95% Wilson interval, in percent."""
    k, n = sum(bool(f) for f in flags), len(flags)
    if n == 0:
        return "-"
    low, high = wilson_interval(k, n)
    return f"{k}/{n} = {100 * k / n:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def _format_mean(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{sum(values) / len(values):.4g}"


def markdown_table(header: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    """A markdown table of string cells: the header, then a line per row."""
    lines = [header, ["---"] * len(header), *body]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def table(rows: Sequence[dict], by: Sequence[str]) -> str:
    """A markdown table: one line per group (all rows when `by` is empty)."""
    rates, means = _metric_fields(rows, by)
    header = [*by, "trials", *(f"{k} [95% CI]" for k in rates), *means]
    body = []
    for group, sel in group_rows(rows, by).items():
        cells = [str(v) for v in group] + [str(len(sel))]
        cells += [format_rate([r[k] for r in sel if k in r]) for k in rates]
        cells += [_format_mean([r[k] for r in sel if k in r]) for k in means]
        body.append(cells)
    return markdown_table(header, body)


def find_sweeps(directory: str) -> list[str]:
    """Every sweep folder (one holding `sweep.json`) under `directory`."""
    found = glob.glob(os.path.join(directory, "**", "sweep.json"), recursive=True)
    return sorted(os.path.dirname(p) for p in found)


def sweep_progress(sweep_dir: str) -> dict:
    """Trials done (in committed chunks) and trials in the sweep."""
    meta = _read_json(os.path.join(sweep_dir, "sweep.json"))
    trials = int(meta.get("trials", 0))
    # Trials, not rows: a trial may give several rows (one per victim).
    done = min(committed_chunks(sweep_dir) * int(meta.get("chunk_size", 1)), trials)
    return {
        "done": done,
        "trials": trials,
        "finished": os.path.exists(os.path.join(sweep_dir, "results.jsonl")),
    }


def committed_chunks(sweep_dir: str) -> int:
    """Chunks committed by a checkpoint: the newest finished orbax step's number.

    A chunk file written by a run killed before its checkpoint landed is not
    counted (the rerun recomputes it); unfinished orbax saves have non-numeric names.
    """
    folder = os.path.join(sweep_dir, "checkpoints")
    steps = (
        [int(n) for n in os.listdir(folder) if n.isdigit()]
        if os.path.isdir(folder)
        else []
    )
    return max(steps, default=0)


def chunk_rows(sweep_dir: str) -> list[dict]:
    """Rows of every committed chunk, in chunk order."""
    rows = []
    for i in range(committed_chunks(sweep_dir)):
        path = os.path.join(sweep_dir, "chunks", f"{i:05d}.jsonl")
        rows.extend(_read_jsonl(path))
    return rows


def _read_jsonl(path: str) -> list[dict]:
    """The rows of a JSONL file; one clear error if it is missing or damaged."""
    try:
        rows = read_jsonl(path)
    except (OSError, ValueError) as e:
        raise UserInputError(f"{path} is missing or damaged ({e})") from None
    if not all(isinstance(r, dict) for r in rows):
        raise UserInputError(f"{path} is damaged (a line is not a JSON object)")
    return rows


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserInputError(f"{path} is missing or damaged ({e})") from None


def load_rows(directory: str) -> dict[str, list[dict]]:
    """Row sources: `results.jsonl` of a finished run, else each sweep's chunks."""
    results = os.path.join(directory, "results.jsonl")
    if os.path.exists(results):
        return {"results.jsonl": flatten(_read_jsonl(results))}
    sources = {}
    for sweep_dir in find_sweeps(directory):
        rel = os.path.relpath(sweep_dir, directory)
        name = "chunks" if rel == "." else f"{rel}/chunks"
        sources[name] = flatten(chunk_rows(sweep_dir))
    return sources


def render(directory: str, by: Sequence[str] | None = None) -> str:
    """The report's markdown text."""
    sweeps = find_sweeps(directory)
    sources = load_rows(directory)
    if not sweeps and not sources:
        raise UserInputError(
            f"{directory} holds no results.jsonl and no sweep (sweep.json)"
        )
    title = os.path.basename(os.path.abspath(directory))
    out = [f"# Report: {title}", ""]
    if sweeps:
        out += [
            "## Progress",
            "",
            "| sweep | trials done | status |",
            "| --- | --- | --- |",
        ]
        for s in sweeps:
            p = sweep_progress(s)
            status = "finished" if p["finished"] else "partial"
            name = os.path.relpath(s, directory)
            out.append(f"| {name} | {p['done']} of {p['trials']} | {status} |")
        out.append("")
    summary_path = os.path.join(directory, "summary.json")
    summary = None
    if os.path.exists(summary_path):
        summary = _read_json(summary_path)
        summary_text = json.dumps(summary, indent=2, sort_keys=True)
    for name, rows in sources.items():
        keys = list(by) if by else natural_keys(rows, summary_hints(summary))
        missing = [k for k in keys if not all(k in r for r in rows)]
        if missing:
            raise UserInputError(f"{name}: no field {missing[0]!r} in every row")
        out += [f"## Results: `{name}` ({len(rows)} rows)", ""]
        if keys:
            out += [f"Grouped by {', '.join(f'`{k}`' for k in keys)}.", ""]
        out += [table(rows, keys) if rows else "No finished chunk yet.", ""]
    if summary is not None:
        text = summary_text
        out += ["## summary.json", "", "<details><summary>summary.json</summary>", ""]
        out += ["```json", text, "```", "", "</details>", ""]
    figures = sorted(glob.glob(os.path.join(directory, "**", "*.png"), recursive=True))
    if figures:
        out += ["## Figures", ""]
        for path in figures:
            rel = os.path.relpath(path, directory)
            out += [f"![{rel}]({rel})", ""]
    return "\n".join(out)


def write_report(directory: str, by: Sequence[str] | None = None) -> str:
    """Writes `directory/report.md`; returns its path."""
    if not os.path.isdir(directory):
        raise UserInputError(f"no such run directory: {directory}")
    path = os.path.join(directory, "report.md")
    atomic_write_text(path, render(directory, by))
    return path


_FLAGS = flags.FlagValues()  # report's own flags, apart from the run command's
flags.DEFINE_string(
    "by", "", "Comma-separated fields to group rows by.", flag_values=_FLAGS
)
USAGE = """\
Usage: jaxpoison report DIR [--by FIELD,...]   (or python -m jaxpoison.report DIR)
Writes DIR/report.md from a finished or partial run and prints its path.
"""


def main(argv: Sequence[str] | None = None, prog: str = "jaxpoison.report") -> int:
    """`jaxpoison report DIR [--by a,b]`; `argv` without the program name.

    Returns the exit code: 0, or 2 with one line on stderr for bad input.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "-help", "--helpshort") for a in argv):
        print(USAGE + _FLAGS.module_help(__name__).split("\n", 2)[-1])
        return 0
    try:
        rest = _FLAGS([prog, *argv])[1:]
        if len(rest) != 1:
            raise UserInputError(
                f"expected one run directory, got {len(rest)}: jaxpoison report DIR"
            )
        by = [k for k in _FLAGS.by.split(",") if k] or None
        print(write_report(rest[0], by))
    except (UserInputError, flags.Error) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    finally:
        _FLAGS.unparse_flags()
    return 0


if __name__ == "__main__":
    sys.exit(main())

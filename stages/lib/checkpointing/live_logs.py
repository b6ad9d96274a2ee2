"""DVCLive metric logs that continue across sessions with no duplicate or missing steps.

DVCLive keeps one `.tsv` per metric under `<live>/plots/metrics/` (columns `step` and the metric) and the latest
values in `<live>/metrics.json`. A session that resumes from the checkpoint of step k first drops the rows newer
than k (logged by a session that crashed or was killed after its last checkpoint) and rebuilds metrics.json from
what remains, so the next rows follow on exactly.
"""

import csv
import json
import os
import shutil
from pathlib import Path

from stages.lib.base.errors import UserError
from stages.lib.base.files import replaced_folder, write_atomically


def open_live(live_dir: Path, resume_step: int | None):
    """A DVCLive logger continuing after `resume_step`, or starting empty when it is None (a new run)."""
    if resume_step is not None:
        truncate_logs(live_dir, resume_step)
    from dvclive import Live  # slow to import: only when a session logs

    # dvcyaml=None: never rewrite the repository's dvc.yaml; save_dvc_exp=False: never create experiments.
    return Live(dir=str(live_dir), resume=resume_step is not None, dvcyaml=None, save_dvc_exp=False)


def logged_step(live_dir: Path) -> int:
    """The last step recorded in `<live>/metrics.json`, or -1 when there is none."""
    try:
        return int(json.loads((Path(live_dir) / "metrics.json").read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def snapshot_logs(live_dir: Path, snapshot_dir: Path) -> None:
    """Copy the logs (when there are any) into `snapshot_dir`, a folder that does not exist yet."""
    if Path(live_dir).is_dir():
        shutil.copytree(live_dir, snapshot_dir)


def restore_logs(snapshot_dir: Path, live_dir: Path) -> bool:
    """Put the snapshot's logs back when they are newer than those in `live_dir`; True when it did."""
    if logged_step(snapshot_dir) <= logged_step(live_dir):
        return False
    with replaced_folder(live_dir) as folder:  # new files, never written in place (the DVC cache may link them)
        shutil.copytree(snapshot_dir, folder, dirs_exist_ok=True)
    return True


def logged_rows(live_dir: Path, metric: str) -> list[tuple[int, float]]:
    """(step, value) of every row logged for `metric` (`train/loss`), in order; empty when there are none."""
    path = _metrics_root(live_dir) / f"{metric}.tsv"
    if not path.is_file():
        return []
    header, rows = _read_tsv(path)
    return [(int(row[header.index("step")]), float(row[-1])) for row in rows]


def has_logs(live_dir: Path) -> bool:
    """Whether a previous run left metric logs here."""
    return (Path(live_dir) / "metrics.json").exists() or any(_metric_files(live_dir))


def truncate_logs(live_dir: Path, last_step: int) -> None:
    """Drop every logged row with a step above `last_step`, then rewrite metrics.json to match."""
    summary: dict = {}
    for path in _metric_files(live_dir):
        header, rows = _read_tsv(path)
        kept = [row for row in rows if int(row[0]) <= last_step]
        if len(kept) < len(rows):
            write_atomically(path, _tsv_text(header, kept))
        if kept:
            name = path.relative_to(_metrics_root(live_dir)).with_suffix("").parts
            _set_nested(summary, name, _number(kept[-1][-1]))
    if summary or (Path(live_dir) / "metrics.json").exists():
        summary["step"] = last_step
        write_atomically(Path(live_dir) / "metrics.json", json.dumps(summary, indent=4) + "\n")


def _metrics_root(live_dir: Path) -> Path:
    return Path(live_dir) / "plots" / "metrics"


def _metric_files(live_dir: Path) -> list[Path]:
    return sorted(_metrics_root(live_dir).rglob("*.tsv"))


def _read_tsv(path: Path) -> tuple[list[str], list[list[str]]]:
    """The header and rows (step first) of a metric log. A row that cannot be read (a process killed while DVCLive
    appended it, a hand edit) is dropped with a note naming it: these are logs, not training state."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            table = [row for row in csv.reader(f, delimiter="\t") if row]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"{path} cannot be read ({err}); delete it (it only holds logs) or restore it with "
                        "`dvc checkout`") from None
    if not table or table[0][:1] != ["step"] or len(table[0]) != 2:
        raise UserError(f"{path}: expected DVCLive's header `step<TAB><metric>`, got {table[0] if table else 'nothing'}"
                        "; delete the file (it only holds logs) or restore it with `dvc checkout`")
    rows = []
    for number, row in enumerate(table[1:], 2):
        if len(row) == 2 and row[0].isdigit() and _number(row[1]) != row[1]:
            rows.append(row)
        else:
            print(f"note: {path}:{number}: dropped a log row that cannot be read: {chr(9).join(row)!r}")
    return table[0], rows


def _tsv_text(header: list[str], rows: list[list[str]]) -> str:
    return "".join("\t".join(row) + os.linesep for row in [header, *rows])


def _set_nested(summary: dict, keys: tuple[str, ...], value) -> None:
    for key in keys[:-1]:
        summary = summary.setdefault(key, {})
    summary[keys[-1]] = value


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text

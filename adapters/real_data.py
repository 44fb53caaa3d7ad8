"""Real data for stage 1: a --dataset (a save_to_disk folder, a JSONL file, a hub id or a paper
benchmark's name) loaded into our columns, and judged CRM data (--crm-data) read, each checked line by
line with errors that name the file, line and column. Plumbing a tutorial reader can skip: 01_sft_rm.py
is the lesson; `cfg` below is its Config."""
import json
from pathlib import Path


def dataset_columns(cfg) -> list[str]:
    """The columns every row of a real dataset needs."""
    columns = [cfg.image_column, cfg.question_column, cfg.answer_column]
    return columns + [cfg.target_column] * bool(cfg.target_column)


def check_jsonl_dataset(cfg, path: str) -> None:
    """A JSONL --dataset read line by line first: a broken line, a row that is not an object or lacks a
    column, or a file with no rows stops here with the file and the line named (datasets' own errors name
    neither)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise SystemExit(f"--dataset {path}: cannot read it as UTF-8 text ({error}).")
    rows = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise SystemExit(f"--dataset {path}, line {number}: not valid JSON ({error}).")
        if not isinstance(row, dict):
            raise SystemExit(f"--dataset {path}, line {number}: not a JSON object (one row per line).")
        for column in dataset_columns(cfg):
            if column not in row:
                raise SystemExit(f"--dataset {path}, line {number}: no column '{column}'. Columns: "
                                 f"{list(row)}. Name the right one with --image-column, --question-column, "
                                 f"--answer-column or --target-column.")
            if row[column] is None or (column == cfg.image_column and not isinstance(row[column], str)):
                wanted = "an image path (relative to the file)" if column == cfg.image_column else "a value"
                raise SystemExit(f"--dataset {path}, line {number}: column '{column}' holds {row[column]!r}; "
                                 f"it must hold {wanted}.")
        rows += 1
    if rows == 0:
        raise SystemExit(f"--dataset {path}: the file holds no rows (one JSON object per line).")


def jsonl_lines(cfg, image) -> list[int]:
    """The lines of a JSONL --dataset whose image is `image` (a row's undecoded image: {"path", "bytes"}), so
    an error can name the line of the file: a row number is one of the split, shuffled when 5 % is held out.
    Empty for any other source."""
    source = str(cfg.dataset)
    if not (source.endswith(".jsonl") and Path(source).is_file() and isinstance(image, dict)):
        return []
    base = Path(source).resolve().parent
    lines = Path(source).read_text(encoding="utf-8").splitlines()
    return [number for number, line in enumerate(lines, start=1) if line.strip()
            and str(base / json.loads(line)[cfg.image_column]) == image.get("path")]


def load_real_dataset(cfg):
    """--dataset as a load_from_disk folder, a JSONL file (image paths relative to it), a hub id, or a paper
    benchmark's name (adapters/benchmarks.py: its evaluated split in our columns, 5 % held out to test)."""
    from datasets import DatasetDict, Image as ImageFeature, load_dataset, load_from_disk

    from adapters import benchmarks

    source = cfg.dataset
    try:
        if Path(source).is_dir() and any((Path(source) / f).exists() for f in ("dataset_dict.json",
                                                                               "dataset_info.json")):
            data = load_from_disk(source)
        elif source in benchmarks.BENCHMARKS:  # image, question, answer + the comparator's columns
            data = benchmarks.load(source)
        elif source.endswith((".jsonl", ".json")):
            if not Path(source).is_file():
                raise SystemExit(f"--dataset {source}: no such file.")
            if source.endswith(".jsonl"):
                check_jsonl_dataset(cfg, source)
            data = load_dataset("json", data_files={cfg.train_split: source})
        else:
            data = load_dataset(source)
    except SystemExit:
        raise
    except Exception as error:  # a hub id that does not exist, no network, a .json file that is not JSON
        raise SystemExit(f"--dataset {source}: cannot load it ({error!r}). Pass a hub id, a save_to_disk "
                         f"folder or a JSONL file.")
    if not isinstance(data, DatasetDict):
        data = DatasetDict({cfg.train_split: data})
    for split in (cfg.train_split,) + (cfg.test_split,) * (cfg.test_split in data):
        if split not in data:
            raise SystemExit(f"--dataset {source}: no split '{split}' (splits: {list(data)}). "
                             f"Name it with --train-split.")
    for split, ds in data.items():
        for column in dataset_columns(cfg):
            if column not in ds.column_names:
                raise SystemExit(f"--dataset {source} (split {split}): no column '{column}'. "
                                 f"Columns: {ds.column_names}. Name the right one with --image-column, "
                                 f"--question-column, --answer-column or --target-column.")
        if source.endswith((".jsonl", ".json")) and ds.features[cfg.image_column].dtype == "string":
            base = Path(source).resolve().parent
            ds = ds.map(lambda row: {cfg.image_column: str(base / row[cfg.image_column])})
            data[split] = ds.cast_column(cfg.image_column, ImageFeature(decode=False))
    if cfg.test_split not in data:  # hold out 5 % when the source has no test split
        if len(data[cfg.train_split]) < 2:
            raise SystemExit(f"--dataset {source}: split '{cfg.train_split}' has "
                             f"{len(data[cfg.train_split])} row(s) and there is no '{cfg.test_split}' split "
                             f"to test on: give at least 2 rows.")
        held = data[cfg.train_split].train_test_split(test_size=0.05, seed=cfg.seed)
        data = DatasetDict({cfg.train_split: held["train"], cfg.test_split: held["test"]})
    return data


def read_crm_jsonl(path: str) -> list[dict]:
    """Real CRM data: one JSON object per line with question, thinking, answer and label (0/1 or a name)."""
    if not Path(path).is_file():
        raise SystemExit(f"--crm-data {path}: no such file.")
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        number = data.count(b"\n", 0, error.start) + 1
        raise SystemExit(f"--crm-data {path}, line {number}: byte {data[error.start]:#04x} is not UTF-8 text "
                         f"({error.reason}); save the file as UTF-8.")
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            label = row["label"]
            if isinstance(label, str):
                label = {"inconsistent": 0, "consistent": 1}.get(label, label)
            if label not in (0, 1, True, False):
                raise ValueError(f"label {row['label']!r} is not 0/1/consistent/inconsistent")
            rows.append({"question": str(row["question"]), "thinking": str(row["thinking"]),
                         "answer": str(row["answer"]), "label": int(label)})
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise SystemExit(f"{path}, line {number}: {error!r}. Each line must be a JSON object with "
                             f"question, thinking, answer and label.")
    return rows


def check_crm_rows(rows: list[dict], source: str) -> None:
    """CRM data must hold both labels and at least 2 rows (5 % of them, at least one, is held out to test)."""
    consistent = sum(r["label"] for r in rows)
    if len(rows) < 2 or consistent in (0, len(rows)):
        raise SystemExit(f"{source}: {len(rows)} labelled rows, {consistent} of them consistent: the CRM "
                         f"needs at least 2 rows and both labels (consistent, inconsistent) to learn from.")

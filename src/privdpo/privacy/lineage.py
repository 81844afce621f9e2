"""Lineage: what a run was made from, so that a privacy statement can cover the pipeline.

Every run writes `lineage.json` (in the run directory and beside every exported model):
the sha256 and row count of each input file, the model it started from (a hash of its
config and weight index, and, when privdpo made it, that model's own lineage), where the
tokenizer came from, the code version, and the *stages* behind the model: every training
run (or tokenizer fit) whose data shaped it, in order, each with its privacy unit and
ledger (None when it had no privacy) and its users.

User ids never appear in clear: a stage's users are stored as salted HMAC-SHA256 hashes in
`users.json`, with a per-project salt file created on first use (`data.user_salt_file`,
kept out of run directories), so two stages' user sets can be compared and nothing else.
Hashes made under another salt cannot be compared: such stages count as overlapping.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import subprocess
from pathlib import Path

from privdpo.errors import UserError

LINEAGE = "lineage.json"
USERS = "users.json"
FORMAT = 1


# ---- users --------------------------------------------------------------------------------


def load_salt(path: str | Path, run_dir: Path | None = None) -> bytes:
    """The project's salt, created (32 random bytes, owner-only) on first use."""
    path = Path(path).expanduser()
    if run_dir is not None and _inside(path, run_dir):
        raise UserError(
            f"data.user_salt_file: {path} is inside the run directory {run_dir}; the salt must"
            " stay out of what a run writes (set it to a path outside output.dir)"
        )
    if not path.exists():
        # Written whole under a private name, then linked into place: several processes
        # starting at once (torchrun) all end up reading the one salt that won.
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    salt = path.read_bytes()
    if len(salt) < 16:
        raise UserError(
            f"data.user_salt_file: {path} holds {len(salt)} bytes, not a salt; delete it"
        )
    return salt


def salt_id(salt: bytes) -> str:
    """Names the salt (not reversible): hashes under equal salt ids are comparable."""
    return hashlib.sha256(b"privdpo-salt-id" + salt).hexdigest()[:16]


def hash_users(user_ids, salt: bytes) -> list[str]:
    """Sorted distinct salted hashes of the user ids."""
    return sorted(
        {hmac.new(salt, str(u).encode(), hashlib.sha256).hexdigest()[:32] for u in user_ids}
    )


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(Path(directory).resolve())
        return True
    except ValueError:
        return False


# ---- records ------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def input_record(path: str | Path, rows: int | None, split: str) -> dict:
    """An input data file (or a datasets directory, hashed file by file)."""
    p = Path(path)
    if p.is_dir():
        digest = hashlib.sha256()
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            digest.update(str(f.relative_to(p)).encode() + b"\0" + sha256_file(f).encode())
        sha = digest.hexdigest()
    else:
        sha = sha256_file(p)
    return {"path": str(p), "split": split, "sha256": sha, "rows": rows}


def model_record(model_cfg) -> dict:
    """The starting model: a preset, or a directory (a hash of its config and of its weight
    index: file names, sizes and safetensors headers), with its own lineage if privdpo
    wrote one there: the run that made it and the sha256 of the lineage.json and
    privacy.json found beside it (None where there is none)."""
    if model_cfg.preset:
        return {"kind": "preset", "preset": model_cfg.preset, "trained_by_privdpo": False}
    root = Path(model_cfg.path).expanduser()
    index = hashlib.sha256()
    for f in sorted(root.glob("*.safetensors")):
        with open(f, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            index.update(f.name.encode() + b"\0" + str(f.stat().st_size).encode() + fh.read(size))
    for name in ("model.safetensors.index.json",):
        if (root / name).is_file():
            index.update(sha256_file(root / name).encode())
    lineage = read_lineage(root)
    return {
        "kind": "path",
        "path": str(root),
        "config_sha256": sha256_file(root / "config.json")
        if (root / "config.json").is_file()
        else None,
        "weights_index_sha256": index.hexdigest(),
        "trained_by_privdpo": lineage is not None and bool(lineage.get("stages")),
        "privdpo_run": lineage.get("run_dir") if lineage else None,
        "lineage_json": _file_record(root / LINEAGE),
        "privacy_json": _file_record(root / "privacy.json"),
    }


def _file_record(path: Path) -> dict | None:
    return {"path": str(path), "sha256": sha256_file(path)} if path.is_file() else None


def tokenizer_record(model_cfg) -> tuple[dict, dict | None]:
    """Where the tokenizer came from, and the lineage privdpo wrote beside a tokenizer of
    its own (`model.tokenizer_path`), if any."""
    if model_cfg.preset:
        origin = "the preset's tokenizer, trained on privdpo's packaged public text"
        return {"origin": origin}, None
    if not model_cfg.tokenizer_path:
        return {"origin": "saved with the starting model", "path": str(model_cfg.path)}, None
    root = Path(model_cfg.tokenizer_path).expanduser()
    record = {
        "origin": "model.tokenizer_path",
        "path": str(root),
        "lineage_json": _file_record(root / LINEAGE),
    }
    return record, read_lineage(root)


def code_version() -> dict:
    from privdpo import __version__

    out = {"privdpo": __version__, "git_commit": None}
    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


# ---- reading and writing -------------------------------------------------------------------


def read_lineage(directory: str | Path) -> dict | None:
    """The lineage privdpo wrote in `directory` (a run or model directory), or None."""
    path = Path(directory) / LINEAGE
    if not path.is_file():
        return None
    try:
        lineage = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}); it was not written by privdpo") from None
    users_path = Path(directory) / USERS
    lineage["_user_hashes"] = (
        json.loads(users_path.read_text(encoding="utf-8")) if users_path.is_file() else {}
    )
    return lineage


def stage_record(
    stage_id: str, recipe: str, run_dir, private: bool, unit: str | None, users, salt
) -> dict:
    """One stage: a run (or a tokenizer fit) and the users of its data (`users` None when
    the data names no users)."""
    known = users is not None
    return {
        "id": stage_id,
        "recipe": recipe,
        "run_dir": str(run_dir) if run_dir is not None else None,
        "private": private,
        "unit": unit,
        "ledger": None,  # filled in at the end of a private run
        "delta": None,
        "users": {
            "known": known,
            "count": len(users) if known else None,
            "salt_id": salt_id(salt) if known else None,
        },
    }


def write_lineage(lineage: dict, user_hashes: dict, *directories: Path) -> None:
    """lineage.json and users.json into each directory."""
    clean = {k: v for k, v in lineage.items() if not k.startswith("_")}
    for d in directories:
        (d / LINEAGE).write_text(json.dumps(clean, indent=2) + "\n", encoding="utf-8")
        (d / USERS).write_text(json.dumps(user_hashes, indent=1) + "\n", encoding="utf-8")


def new_lineage(
    recipe: str, run_dir, inputs: list[dict], start_model: dict, tokenizer: dict
) -> dict:
    return {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "code": code_version(),
        "recipe": recipe,
        "run_dir": str(run_dir),
        "inputs": inputs,
        "start_model": start_model,
        "tokenizer": tokenizer,
        "stages": [],
    }


def stage_id_for(run_dir, inputs: list[dict]) -> str:
    digest = hashlib.sha256(str(Path(run_dir).resolve()).encode())
    for record in inputs:
        digest.update(record["sha256"].encode())
    digest.update(datetime.datetime.now(datetime.timezone.utc).isoformat().encode())
    return digest.hexdigest()[:16]


# ---- a run's lineage ------------------------------------------------------------------------


class RunLineage:
    """Begun before training (the starting model's lineage read, this run's users hashed,
    what the end-to-end statement can cover decided and said, a run that must cover all
    its users refused); finished beside every export."""

    def __init__(self, lineage: dict, user_hashes: dict, coverage, stage: dict):
        self.lineage = lineage
        self.user_hashes = user_hashes
        self.coverage = coverage
        self.stage = stage

    @classmethod
    def begin(cls, cfg, recipe: str, items: list, evals: list, summary, unit: str | None):
        """`items`/`evals`: the training and held-out rows (with `user_id`); `unit`: the
        privacy unit of a private run, else None."""
        from privdpo.privacy.statement import analyze

        run_dir = Path(cfg.output.dir)
        rows = list(items) + list(evals)
        ids = [r.user_id for r in rows]
        users = None
        salt = None
        if rows and all(u is not None for u in ids):
            salt = load_salt(cfg.data.user_salt_file, run_dir)
            users = hash_users(ids, salt)
        inputs = [
            input_record(
                path, n, "eval" if cfg.data.eval and str(path) == str(cfg.data.eval) else "train"
            )
            for path, n in summary.rows_read.items()
        ]
        start = model_record(cfg.model)
        parent = read_lineage(Path(cfg.model.path).expanduser()) if cfg.model.path else None
        ancestors = list(parent["stages"]) if parent else []
        ancestor_users = dict(parent["_user_hashes"].get("stages", {})) if parent else {}
        tokenizer, tok = tokenizer_record(cfg.model)
        if tok:  # a tokenizer of its own: the stages behind it (a fit on private text) count
            known = {st["id"] for st in ancestors}
            ancestors += [st for st in tok["stages"] if st["id"] not in known]
            for stage_id, hashes in tok["_user_hashes"].get("stages", {}).items():
                ancestor_users.setdefault(stage_id, hashes)
        sid = salt_id(salt) if salt is not None else None
        coverage = analyze(
            ancestors, ancestor_users, set(users) if users is not None else None, sid, unit, start
        )
        lineage = new_lineage(recipe, run_dir, inputs, start, tokenizer)
        stage = stage_record(
            stage_id_for(run_dir, inputs),
            recipe,
            run_dir,
            unit is not None,
            unit,
            users,
            salt or b"",
        )
        lineage["stages"] = [*ancestors, stage]
        hashes = dict(ancestor_users)
        if users is not None:
            hashes[stage["id"]] = {"salt_id": sid, "hashes": users}
        for problem in coverage.problems():
            print(f"warning: {problem}")
        if coverage.relative_to:
            print(
                f"note: the starting model {coverage.relative_to} was not trained by privdpo; a"
                " privacy statement of this run is relative to it"
            )
        if unit is not None and cfg.privacy.require_end_to_end and coverage.problems():
            raise UserError(
                "privacy.require_end_to_end: this run's statement would not cover all its"
                f" users end to end: {'; '.join(coverage.problems())}. Train the earlier stage"
                " with privacy (or on other users), or set privacy.require_end_to_end=false"
            )
        return cls(lineage, {"stages": hashes}, coverage, stage)

    def finish(self, run_dir: Path, exported: list[Path], dp) -> dict | None:
        """Write lineage.json and users.json (and privacy.json of a private run) into the
        run directory and every exported model; return the statement."""
        if dp is not None:
            self.stage["ledger"] = dp.ledger.to_dict()
            self.stage["delta"] = dp.plan.delta
        write_lineage(self.lineage, self.user_hashes, run_dir, *exported)
        if dp is None:
            return None
        from privdpo.privacy.statement import write_statement

        statement = dp.statement(self.coverage)
        write_statement(statement, run_dir, *exported)
        return statement

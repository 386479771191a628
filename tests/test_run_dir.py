"""A run never destroys another run: numbered directories, refusal of an explicit one, overwrite moves aside."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastsupmae.engine import run_dir


def _fake_run(d: Path, text: str = "run") -> None:
    (d / "checkpoints" / "step_00000001").mkdir(parents=True)
    (d / "checkpoints" / "latest").write_text("step_00000001")
    (d / "config.yaml").write_text(text)
    (d / "metrics.jsonl").write_text('{"step": 1}\n')


def test_default_directory_moves_on_to_a_numbered_sibling(tmp_path: Path) -> None:
    d = tmp_path / "demo"
    assert run_dir.prepare(d, "", explicit=False, overwrite=False) == d  # empty: used as it is
    _fake_run(d)
    assert run_dir.prepare(d, "", explicit=False, overwrite=False) == tmp_path / "demo-2"
    _fake_run(tmp_path / "demo-2")
    assert run_dir.prepare(d, "", explicit=False, overwrite=False) == tmp_path / "demo-3"
    assert (d / "config.yaml").read_text() == "run"  # untouched


def test_explicit_directory_holding_a_run_is_refused_with_the_choices(tmp_path: Path) -> None:
    d = tmp_path / "mine"
    _fake_run(d)
    with pytest.raises(run_dir.RunDirError, match="train.resume=auto.*train.output_dir.*train.overwrite=true"):
        run_dir.prepare(d, "", explicit=True, overwrite=False)
    assert run_dir.prepare(d, "auto", explicit=True, overwrite=False) == d  # continuing is what resume is for


def test_overwrite_moves_the_old_run_aside(tmp_path: Path) -> None:
    d = tmp_path / "mine"
    _fake_run(d, "old run")
    assert run_dir.prepare(d, "", explicit=True, overwrite=True) == d
    assert not run_dir.holds_run(d)
    old = [p for p in tmp_path.iterdir() if p.name.startswith("mine.old-")]
    assert len(old) == 1 and (old[0] / "config.yaml").read_text() == "old run"


@pytest.mark.parametrize("kind", ["file", "proc", "sysfs"])
def test_unusable_output_directory_is_one_message(tmp_path: Path, kind: str) -> None:
    """A file where a directory should be, a path under /proc, a read-only filesystem (sysfs refuses new
    directories even to root, which writes through permission bits)."""
    if kind == "file":
        (tmp_path / "f").write_text("x")
        d = tmp_path / "f" / "run"
    else:
        d = Path(f"/{kind if kind == 'proc' else 'sys'}/fastsupmae_run")
    with pytest.raises(run_dir.RunDirError, match="train.output_dir .* cannot be used"):
        run_dir.prepare(d, "", explicit=True, overwrite=False)


@pytest.mark.parametrize(("overrides", "given"), [
    (["train.output_dir=runs/mine"], True),
    ([" train.output_dir = runs/mine"], True),  # spaces around the key, as parse_overrides reads it
    (["train.output_dir="], True),  # an empty value is still the user's choice
    (["train.epochs=2", "model.size=small"], False),
    (["train.output_dir_old=x"], False),  # a longer key is another key
    ([], False),
    (None, False),
])
def test_an_output_dir_override_is_explicit(overrides: list[str] | None, given: bool) -> None:
    """What tasks use to tell a directory the user named (refused when it holds a run) from the default."""
    from fastsupmae.config import override_sets

    assert override_sets(overrides, "train.output_dir") is given

"""The book runner: chapter discovery, profiles and notebook generation."""

from pathlib import Path

import jupytext
import pytest
import yaml

from saelib import book


def test_chapters_follow_the_toc_and_exist():
    stems = book.chapters()
    assert stems[0] == "00_introduction"
    assert stems == sorted(stems), "chapters are numbered in reading order"
    for stem in stems:
        assert (book.repo_root() / "notebooks" / f"{stem}.md").exists(), stem


@pytest.mark.parametrize("stem", book.chapters())
def test_every_chapter_has_one_parameters_cell_and_every_profile(stem):
    nb = jupytext.read(book.repo_root() / "notebooks" / f"{stem}.md")
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{stem} needs exactly one cell tagged 'parameters'"
    defaults = {}
    exec(tagged[0].source, {}, defaults)  # plain assignments only
    for profile in book.PROFILES:
        params = book.profile_parameters(profile, stem)
        unknown = set(params) - set(defaults)
        assert not unknown, f"profiles/{profile}/{stem}.yaml sets {unknown}, not in the parameters cell"
        assert (book.repo_root() / "profiles" / profile / f"{stem}.yaml").exists()


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown profile 'nope'"):
        book.profile_parameters("nope", "00_introduction")


def test_profile_from_a_folder(tmp_path: Path):
    (tmp_path / "00_introduction.yaml").write_text(yaml.safe_dump({"seed": 3}))
    assert book.profile_parameters(tmp_path, "00_introduction") == {"seed": 3}
    (tmp_path / "00_introduction.yaml").write_text("- not a mapping\n")
    with pytest.raises(ValueError, match="mapping"):
        book.profile_parameters(tmp_path, "00_introduction")


def test_prepare_injects_profile_parameters(tmp_path: Path):
    (out,) = book.prepare("ci", tmp_path, only=["00_introduction"])
    nb = jupytext.read(out)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1
    assert "runs/ci" in injected[0].source


def test_runs_dir_is_rooted_at_the_repo(tmp_path: Path):
    assert book.runs_dir(tmp_path / "x") == tmp_path / "x"
    rel = book.runs_dir("runs/test-book-runs")
    assert rel == book.repo_root() / "runs" / "test-book-runs" and rel.is_dir()
    rel.rmdir()


def test_every_top_level_export_resolves():
    import saelib

    for name in saelib.__all__:
        assert getattr(saelib, name) is not None, name
    with pytest.raises(AttributeError):
        saelib.not_a_name  # noqa: B018

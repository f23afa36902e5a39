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


EXPORTS = {  # written out here on purpose: the test must not read saelib's own table
    "saelib.models": ["load_model", "hook_name", "check_hook", "hook_layer"],
    "saelib.data": ["load_texts", "token_rows", "iter_token_rows"],
    "saelib.activations": ["harvest", "ActivationStore", "ActivationCache", "tensor_batches", "activation_cache_path"],
    "saelib.sae": ["SAE", "SAEConfig", "SAEOutput", "load_sae"],
    "saelib.topafa": ["topafa_select", "topafa_select_reference"],
    "saelib.train": ["TrainConfig", "train_saes", "sweep_configs", "ensure_sweep", "load_saes"],
    "saelib.interop": ["to_saelens", "from_saelens"],
    "saelib.afa": ["epsilon", "welch_bound", "bound_slopes", "f_tilde", "zf_stats", "zf_summary", "ZFStats",
                   "eps_lbo", "mdl_bits", "concentration_band"],
    "saelib.evaluate": ["evaluate_sae", "evaluate_saes", "reconstruction_metrics", "EvalResult"],
    "saelib.stitching": ["ensure_width_family", "decoder_cosine", "insertion_delta_mse", "classify_latents",
                         "build_families", "stitch", "interpolation_curve"],
    "saelib.meta": ["MetaSAEConfig", "train_meta_sae", "fve", "decompose", "split_recovery"],
}


def test_every_top_level_export_is_the_object_its_module_defines():
    import importlib

    import saelib

    assert sorted(saelib.__all__) == sorted(n for names in EXPORTS.values() for n in names)
    for module, names in EXPORTS.items():
        mod = importlib.import_module(module)
        for name in names:
            obj = getattr(saelib, name)
            assert obj is getattr(mod, name), (module, name)
            # defined there (not re-exported from elsewhere) under its own name
            assert getattr(obj, "__module__", None) == module, (module, name, getattr(obj, "__module__", None))
            assert getattr(obj, "__name__", name) == name, (module, name)
            assert callable(obj), (module, name)
    with pytest.raises(AttributeError):
        saelib.not_a_name  # noqa: B018

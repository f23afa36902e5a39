"""The book runner: chapter discovery, profiles and notebook generation."""

import re
from pathlib import Path

import jupytext
import pytest
import yaml

from saelib import book


@pytest.mark.parametrize("stem", book.chapters())
def test_headings_carry_no_hand_written_numbers(stem):
    """One numbering scheme: the chapter number comes from the file name, MyST numbers sections."""
    nb = jupytext.read(book.repo_root() / "notebooks" / f"{stem}.md")
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                assert not re.match(r"#+ +\d+(\.\d+)*\.? ", line), f"{stem}: hand-numbered heading {line!r}"


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
    "saelib.runs": ["runs_dir", "data_dir", "repo_root"],
    "saelib.lm.models": ["load_model", "hook_name", "check_hook", "hook_layer"],
    "saelib.lm.data": ["load_texts", "token_rows", "iter_token_rows"],
    "saelib.lm.activations": ["harvest", "ActivationStore", "tensor_batches"],
    "saelib.lm.cache": ["ActivationCache"],
    "saelib.sae.core": ["SAE", "SAEConfig", "SAEOutput", "load_sae"],
    "saelib.sae.topafa": ["topafa_select", "topafa_select_reference"],
    "saelib.sae.rules": ["get_rule"],
    "saelib.sae.train": ["TrainConfig", "train_saes", "EarlyStopping"],
    "saelib.sae.metrics": ["ReconstructionMetrics"],
    "saelib.pipeline": ["activation_cache", "activation_cache_path", "sweep_configs", "ensure_sweep", "load_saes",
                        "ensure_width_family"],
    "saelib.interop": ["to_saelens", "from_saelens"],
    "saelib.analysis.afa": ["epsilon", "welch_bound", "bound_slopes", "f_tilde", "zf_stats", "zf_summary", "ZFStats",
                   "eps_lbo", "mdl_bits"],
    "saelib.analysis.concentration": ["concentration_band"],
    "saelib.analysis.evaluate": ["evaluate_sae", "evaluate_saes", "reconstruction_metrics", "EvalResult"],
    "saelib.analysis.stitching": ["decoder_cosine", "insertion_delta_mse", "classify_latents",
                         "build_families", "stitch", "interpolation_curve"],
    "saelib.analysis.meta": ["MetaSAEConfig", "train_meta_sae", "fve", "decompose", "split_recovery"],
    "saelib.analysis.inspect": ["top_activating_contexts", "top_logits", "latent_view"],
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


# --- parameters: checked early, named, injected as literals (issue: book runner parameters) ---------


def test_unknown_profile_parameter_names_the_file_and_the_parameter(tmp_path: Path):
    (tmp_path / "00_introduction.yaml").write_text("sed: 1\n")
    with pytest.raises(book.ParameterError, match=r"00_introduction.yaml: 'sed' is not a parameter.*Did you mean 'seed'"):
        book.chapter_parameters(tmp_path, "00_introduction")


def test_wrong_type_is_rejected_before_anything_runs(tmp_path: Path, monkeypatch):
    (tmp_path / "00_introduction.yaml").write_text("seed: '3'\n")
    import papermill

    def must_not_run(*a, **k):
        raise AssertionError("a kernel was started before the parameters were checked")

    monkeypatch.setattr(papermill, "execute_notebook", must_not_run)
    with pytest.raises(book.ParameterError, match=r"parameter seed must be an int .* got '3' \(str\)"):
        book.run(str(tmp_path), only=["00_introduction"], html=False)
    # a bad value for a later chapter also stops the run before the first chapter starts
    (tmp_path / "00_introduction.yaml").write_text("seed: 3\n")
    (tmp_path / "01_residual_stream.yaml").write_text("batch_size: [1]\n")
    with pytest.raises(book.ParameterError, match="01_residual_stream.yaml"):
        book.run(str(tmp_path), only=["00_introduction", "01_residual_stream"], html=False)


def test_types_follow_the_defaults():
    d = {"n": 3, "lr": 0.1, "flag": True, "name": "x", "opt": None, "xs": [1, 2]}
    ok = {"n": 4, "lr": 1, "flag": False, "name": "y", "opt": "anything", "xs": [3]}
    assert book.validate_parameters("00_introduction", ok, "f.yaml", defaults=d) == ok
    for bad in ({"n": 1.5}, {"n": True}, {"flag": 1}, {"lr": "0.1"}, {"xs": 3}, {"lr": float("nan")}):
        with pytest.raises(book.ParameterError, match="f.yaml"):
            book.validate_parameters("00_introduction", bad, "f.yaml", defaults=d)


def test_values_are_injected_as_literals_never_as_code(tmp_path: Path):
    import ast

    evil = 'x\\"; __import__("os").system("touch PWNED") #\n"'
    nb = book.injected_notebook("00_introduction", {"model_name": evil, "seed": 2}, "test")
    (cell,) = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    values = {}
    for node in ast.parse(cell.source).body:  # only assignments of literals
        assert isinstance(node, ast.Assign)
        values[node.targets[0].id] = ast.literal_eval(node.value)
    assert values == {"model_name": evil, "seed": 2}


def test_command_line_is_strict():
    with pytest.raises(SystemExit):
        book.main(["run", "--profil", "ci"])  # no abbreviations
    with pytest.raises(SystemExit, match="'sed' is not a parameter of any chapter.*'seed'"):
        book.main(["run", "--profile", "ci", "--only", "00_introduction", "--set", "sed=1", "--no-html"])
    with pytest.raises(SystemExit, match="parameter seed must be an int"):
        book.main(["prepare", "--profile", "ci", "--only", "00_introduction", "--set", "seed=[1]"])


def test_direct_papermill_run_rejects_a_misspelt_parameter(tmp_path: Path):
    """papermill only warns about an unknown -p name; the chapter's check cell stops the run."""
    import nbformat
    import papermill

    src = tmp_path / "00.ipynb"
    nbformat.write(book.injected_notebook("00_introduction", {}, "test"), src)
    with pytest.raises(papermill.PapermillExecutionError, match="'sed' is not a parameter.*Did you mean 'seed'"):
        papermill.execute_notebook(str(src), str(tmp_path / "out.ipynb"), parameters={"sed": 1},
                                   kernel_name="python3", progress_bar=False,
                                   cwd=str(book.repo_root() / "notebooks"))
    with pytest.raises(papermill.PapermillExecutionError, match="parameter seed must be an int"):
        papermill.execute_notebook(str(src), str(tmp_path / "out.ipynb"), parameters={"seed": "zero"},
                                   kernel_name="python3", progress_bar=False,
                                   cwd=str(book.repo_root() / "notebooks"))


def test_every_chapter_checks_its_parameters_right_after_them():
    for stem in book.chapters():
        nb = jupytext.read(book.repo_root() / "notebooks" / f"{stem}.md")
        i = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
        nxt = next(c for c in nb.cells[i + 1:] if c.cell_type == "code")
        assert f'check_parameters("{stem}", globals())' in nxt.source, stem


# --- the executed ci book: figures inline, clean outputs ------------------------------------------


def _unconditional_savefig(source: str) -> bool:
    """True when the cell calls savefig outside any `if`/`try` (so the call always runs)."""
    import ast

    def walk(node, guarded):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "savefig":
            return not guarded
        if isinstance(node, (ast.FunctionDef, ast.Lambda)):
            return False
        guarded = guarded or isinstance(node, (ast.If, ast.Try))
        return any(walk(c, guarded) for c in ast.iter_child_nodes(node))

    return walk(ast.parse(source), False)


def _figure_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code" and "savefig(" in c.source]


def test_every_figure_making_cell_shows_its_figure():
    from tests.book_helpers import executed

    counts = {}
    for stem in book.chapters():
        nb = executed(stem)
        n = 0
        for cell in _figure_cells(nb):
            images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
            if _unconditional_savefig(cell.source):
                assert images, f"{stem}: a figure cell has no image output:\n{cell.source[:300]}"
            n += len(images)
        counts[stem] = n
    print("figures per chapter:", counts, "total", sum(counts.values()))
    for stem in ("02_theory", "03_training", "04_evaluation", "05_stitching", "06_meta_saes"):
        assert counts[stem] > 0, stem


def test_executed_pages_hold_no_machine_paths_or_progress_bars():
    import sys

    from tests.book_helpers import executed

    root = str(book.repo_root())
    for stem in book.chapters():
        for cell in executed(stem).cells:
            for out in cell.get("outputs", []):
                text = out.get("text", "") + "".join(
                    v for k, v in out.get("data", {}).items() if k.startswith("text/") and isinstance(v, str))
                where = f"{stem}: {cell.source[:120]!r}"
                assert root not in text and sys.prefix not in text, f"machine path in the output of {where}"
                assert "it/s]" not in text and "Loading weights" not in text and "%|" not in text, \
                    f"progress bar in the output of {where}"
                assert "application/vnd.jupyter.widget-view+json" not in out.get("data", {}), where


def test_html_renderer_merges_prints_and_cuts_wide_tables():
    from saelib import bookhtml

    r = bookhtml._Renderer({"theory": "02_theory.html"})
    outs = {"children": [{"type": "output", "jupyter_data": {"output_type": "stream", "name": "stdout", "text": t}}
                         for t in ("a\n", "b\n")]}
    assert r.n_outputs(outs).count("<pre") == 1
    wide = "<table>" + "<tr>" + "".join(f"<td>c{i}</td>" for i in range(19)) + "</tr></table>"
    cut = bookhtml.cut_wide_tables(wide)
    assert "c0" in cut and "c18" in cut and "c9" not in cut and "columns not shown" in cut
    assert bookhtml.cut_wide_tables("<table><tr><td>1</td></tr></table>") == "<table><tr><td>1</td></tr></table>"
    # MyST nodes: KaTeX html is used as is, cross-references become links, admonitions asides
    assert r.node({"type": "inlineMath", "value": "x", "html": "<span class=\"katex\">x</span>"}) == "<span class=\"katex\">x</span>"
    xref = r.node({"type": "crossReference", "remote": True, "url": "/theory", "html_id": "fig-a",
                   "children": [{"type": "text", "value": "Figure 1"}]})
    assert 'href="02_theory.html#fig-a"' in xref
    adm = r.node({"type": "admonition", "kind": "warning", "children": [{"type": "paragraph", "children": []}]})
    assert adm.startswith('<aside class="admonition warning">')
    md = r.n_output({"jupyter_data": {"output_type": "display_data",
                                      "data": {"text/markdown": {"content": "| a |\n|---|\n| 1 |"}}}})
    assert "<table" in md and "|---|" not in md  # Markdown outputs are rendered, not shown raw
    # figure outputs are numbered per chapter, under the caption savefig recorded
    r.chapter, r.figures = 4, 0
    img = {"jupyter_data": {"output_type": "display_data", "metadata": {"saelib": {"caption": "ZF plot"}},
                            "data": {"image/png": {"path": "/abc.png"}}}}
    first, second = r.n_output(img), r.n_output(img)
    assert "Figure 4.1</span>ZF plot</figcaption>" in first and 'id="figure-4.2"' in second


def test_savefig_records_a_caption():
    import matplotlib.pyplot as plt

    from saelib.plots.style import figure_caption

    fig, (a, b) = plt.subplots(1, 2)
    assert figure_caption(fig, Path("x/eps_vs_welch.png")) == "eps vs welch"
    a.set_title("layer 15")
    b.set_title("layer 18")
    assert figure_caption(fig, Path("x.png")) == "layer 15; layer 18"
    fig.suptitle("ZF plots")
    assert figure_caption(fig, Path("x.png")) == "ZF plots"
    plt.close(fig)


def test_progress_bars_go_to_the_terminal_under_the_runner():
    """With the runner's variable set, library bars (even progress=False) write to the real stderr."""
    import subprocess
    import sys

    code = ("from saelib.runs import check_parameters\n"
            "check_parameters('00_introduction', {})\n"
            "from saelib.lm.activations import _progress\n"
            "b = _progress(1000, 'harvest', False)\nb.update(1000)\nb.close()\n")
    env = {**__import__("os").environ, book.PROGRESS_ENV: "1", "PYTHONPATH": str(book.repo_root())}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "00_introduction: harvest" in out.stderr and "1.00k/1.00k" in out.stderr and out.stdout == ""
    env.pop(book.PROGRESS_ENV)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "harvest" not in out.stderr  # outside the runner, progress=False means no bar


def test_every_shipped_profile_passes_the_checks():
    for profile in book.PROFILES:
        for stem in book.chapters():
            book.chapter_parameters(profile, stem)


def test_myst_features_survive_into_the_offline_html(tmp_path: Path):
    """Admonitions, numbered sections and figures, cross-references and maths, through `myst build --site`."""
    import shutil
    import subprocess
    import sys

    import nbformat

    myst = shutil.which("myst", path=str(Path(sys.executable).parent)) or shutil.which("myst")
    katex = book.repo_root() / "node_modules" / "katex" / "dist"
    if myst is None or not katex.exists():
        pytest.skip("needs `make setup` (mystmd and node_modules/katex)")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(
        "# A chapter\n\nSee {numref}`fig-a` and $x^2$.\n\n:::{note}\nA note.\n:::\n\n## Section\n\n"
        "```{figure} a.png\n:name: fig-a\n\nA caption.\n```\n")]
    nbformat.write(nb, tmp_path / "ch.ipynb")
    import matplotlib.pyplot as plt

    fig, _ = plt.subplots()
    fig.savefig(tmp_path / "a.png")
    plt.close(fig)
    (tmp_path / "myst.yml").write_text("version: 1\nproject:\n  title: T\n  numbering:\n    headings: true\n"
                                       "  toc:\n    - file: ch.ipynb\nsite:\n  template: book-theme\n")
    theme = tmp_path / "_build" / "templates" / "site" / "myst" / "book-theme"
    theme.mkdir(parents=True)
    (theme / "template.yml").write_text(book._STUB_THEME)
    subprocess.run([myst, "build", "--site"], cwd=tmp_path, check=True, capture_output=True, timeout=300)
    from saelib.bookhtml import render_site

    out = render_site(tmp_path / "_build" / "site", tmp_path / "html", katex)
    page = (out / "ch.html").read_text()
    assert '<aside class="admonition note">' in page
    assert '<span class="enum">1</span>Section' in page  # no chapter number in the file name

    assert 'href="#fig-a"' in page and "Figure\u00a01" in page and '<figure class="figure" id="fig-a">' in page
    assert 'class="katex"' in page and "$x^2$" not in page
    assert (out / "katex" / "katex.min.css").exists() and list((out / "katex" / "fonts").glob("*.woff2"))
    assert "A chapter" in (out / "index.html").read_text()


def test_nothing_imports_the_book_runner():
    """Chapters and library modules get check_parameters, rel and runs_dir from saelib.runs; only the
    command line (python -m saelib.book) imports saelib.book."""
    import re

    pattern = re.compile(r"^\s*(from saelib\.book import|import saelib\.book|from saelib import book)", re.M)
    sources = [*book.repo_root().glob("saelib/**/*.py"), *book.repo_root().glob("notebooks/*.md")]
    offenders = [str(p.relative_to(book.repo_root())) for p in sources if pattern.search(p.read_text())]
    assert offenders == [], offenders

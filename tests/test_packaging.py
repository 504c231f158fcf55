"""What ships with the package: the license, the version, the changelog and the CI commands."""

import re
import tomllib

import helpers

import optax_snr

PYPROJECT = tomllib.loads((helpers.REPO / "pyproject.toml").read_text())
DOCS_BUILD = "sphinx-build -W -b html docs docs/_build/html"


def test_license_is_the_apache_2_text():
    text = (helpers.REPO / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    for number, title in enumerate(
        [
            "Definitions",
            "Grant of Copyright License",
            "Grant of Patent License",
            "Redistribution",
            "Submission of Contributions",
            "Trademarks",
            "Disclaimer of Warranty",
            "Limitation of Liability",
            "Accepting Warranty or Additional Liability",
        ],
        start=1,
    ):
        assert f"{number}. {title}." in text, f"section {number} ({title}) is missing"
    assert "END OF TERMS AND CONDITIONS" in text


def test_pyproject_declares_and_ships_the_license():
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"
    assert "LICENSE" in project["license-files"]  # Hatchling puts it in wheel and sdist.


def test_version_lives_in_one_place():
    assert "version" not in PYPROJECT["project"]
    assert "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["hatch"]["version"]["path"] == "optax_snr/__init__.py"


def test_changelog_has_unreleased_and_the_current_version():
    text = (helpers.REPO / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## \[([^\]]+)\]", text, flags=re.MULTILINE)
    assert headings[0] == "Unreleased"
    assert headings[1] == optax_snr.__version__  # The latest release is the current version.


def test_docs_symlinks_stay_out_of_the_sdist():
    """Hatch follows docs/notebooks into notebooks/ and would then skip notebooks/ itself."""
    links = sorted(p for p in (helpers.REPO / "docs").iterdir() if p.is_symlink())
    assert links, "docs/ links the notebooks and benchmarks folders"
    sdist = PYPROJECT["tool"]["hatch"]["build"]["targets"]["sdist"]
    assert sdist["skip-excluded-dirs"] is True
    for link in links:
        assert link.resolve() == helpers.REPO / link.name, f"{link} points elsewhere"
        assert f"docs/{link.name}" in sdist["exclude"]


def test_ci_runs_the_readme_commands_and_builds_the_docs():
    readme = (helpers.REPO / "README.md").read_text()
    ci = (helpers.REPO / ".ci" / "run").read_text().splitlines()
    test_command = next(line for line in ci if "pytest" in line)
    assert test_command in readme
    assert ci.index(DOCS_BUILD) > ci.index(test_command)
    assert 'pip install -e ".[docs]"' in readme and DOCS_BUILD in readme
    assert "optax_snr[docs]" in PYPROJECT["project"]["optional-dependencies"]["test"]


def test_api_reference_lists_every_public_name():
    """A public name missing from docs/api/*.md would have no reference page."""
    listed = set()
    for page in (helpers.REPO / "docs" / "api").glob("*.md"):
        listed.update(re.findall(r"^   ([A-Za-z_][A-Za-z0-9_]*)$", page.read_text(), flags=re.M))
    missing = sorted(set(optax_snr.__all__) - listed)
    assert not missing, f"add to a page in docs/api/: {missing}"


def test_every_notebook_is_in_the_docs_toctree():
    index = (helpers.REPO / "docs" / "index.md").read_text()
    for notebook in sorted((helpers.REPO / "notebooks").glob("*.ipynb")):
        assert f"notebooks/{notebook.stem}\n" in index, f"add {notebook.name} to docs/index.md"

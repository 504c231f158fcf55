"""Sphinx configuration: ``sphinx-build -W -b html docs docs/_build/html``."""

from __future__ import annotations

import inspect
import io
import pathlib
import re
import tokenize

from sphinx import addnodes
from sphinx.transforms import SphinxTransform

import optax_snr

project = "optax_snr"
author = "optax_snr authors"
copyright = "2026, optax_snr authors"
version = release = optax_snr.__version__

extensions = [
    "myst_nb",  # Markdown pages (it loads myst_parser) and notebooks.
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # Google-style Args / Returns / Example sections.
    "sphinx.ext.mathjax",  # The docstrings' ``.. math::`` blocks.
    "sphinx.ext.viewcode",
]
# No intersphinx: it downloads the other projects' inventories at build time, and a
# failed download is an untyped warning, which -W turns into an error on machines
# without network.

templates_path = ["_templates"]
exclude_patterns = ["_build", "**/.ipynb_checkpoints", "benchmarks/results", "Thumbs.db"]

# Markdown (README sections, the changelog) and notebooks ($...$ math in their cells).
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

# Notebooks are committed without outputs: run them at build time, cached in
# docs/_build/.jupyter_cache, so a rebuild re-executes only the notebooks that changed.
nb_execution_mode = "cache"
nb_execution_timeout = 900  # Seconds per cell; the digits training takes well under this.
nb_execution_raise_on_error = True
nb_execution_show_tb = True

# The API pages list objects by their public names (``optax_snr.adam``), so they do not
# depend on the module a name is defined in; autosummary writes one page per object.
autosummary_generate = True
autodoc_default_options = {"members": True, "member-order": "bysource"}
# Signatures without annotations: the docstrings' Args say what each argument takes, and
# Sphinx expands JAX's and Optax's type aliases (ArrayLike, DTypeLike, ScalarOrSchedule)
# into unions a line long. Defaults are shown as written in the source.
autodoc_typehints = "none"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "sphinx_book_theme"
html_title = f"optax_snr {release}"
html_theme_options = {"show_toc_level": 2, "navigation_with_keys": False}


def _field_comments(cls: type) -> dict[str, str]:
    """A NamedTuple's field comments (``mu: Any  # EMA of gradients.``), by field name."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments, last_name = {}, None
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NEWLINE or token.type == tokenize.NL:
            last_name = None
        elif token.type == tokenize.NAME and last_name is None and token.start[1] == 4:
            last_name = token.string
        elif token.type == tokenize.COMMENT and last_name in getattr(cls, "_fields", ()):
            text = token.string.lstrip("#").strip()  # Plain text, not reST: escape markup.
            comments[last_name] = re.sub(r"([\\`*_|])", r"\\\1", text)
    return comments


def _document_fields(app, what, name, obj, options, lines):
    """Shows a state field's source comment instead of "Alias for field number 0"."""
    del app, what, obj, options
    if len(lines) != 1 or not re.fullmatch(r"Alias for field number \d+", lines[0]):
        return
    owner_name, _, field = name.rpartition(".")
    owner = getattr(optax_snr, owner_name.rpartition(".")[2], None)
    comment = _field_comments(owner).get(field, "") if isinstance(owner, type) else ""
    lines[:] = [comment] if comment else []


# docs/notebooks and docs/benchmarks are symlinks to the repository's folders, so the pages
# use the files themselves. Sphinx resolves a Markdown link's path through the symlink, which
# leaves the source folder (README's "notebooks/01_adam_as_snr.ipynb" would become
# "/.../notebooks/01_adam_as_snr"); this maps such links back to the linked pages.
LINKED_FOLDERS = ("notebooks", "benchmarks")


class _LinksThroughSymlinks(SphinxTransform):
    default_priority = 500

    def apply(self, **kwargs):
        del kwargs
        srcdir = pathlib.Path(self.env.srcdir)
        for node in self.document.findall(addnodes.pending_xref):
            target = pathlib.Path(node.get("reftarget", ""))
            if node.get("reftype") != "myst" or not target.is_absolute():
                continue
            for folder in LINKED_FOLDERS:
                real = (srcdir / folder).resolve()
                if target.is_relative_to(real):
                    node["reftarget"] = (folder / target.relative_to(real)).as_posix()


def setup(app):
    app.connect("autodoc-process-docstring", _document_fields)
    app.add_transform(_LinksThroughSymlinks)

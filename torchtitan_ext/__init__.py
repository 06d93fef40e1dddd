"""agoq for torchtitan: 0.2.2 (a model converter plus an ``[agoq]`` config section; the
modules below) and 0.3 (:mod:`torchtitan_ext.v03`), sharing :mod:`torchtitan_ext._runtime`
(what is installed on each model part) and the ``[agoq]`` settings (:mod:`torchtitan_ext.config`).

Modules (imported on demand; importing this package imports neither torch nor torchtitan,
so :mod:`torchtitan_ext.cpu_shims` can run before torchtitan is first imported):

- :mod:`torchtitan_ext.config`: the ``[agoq]`` section, ``--job.custom_config_module
  torchtitan_ext.config``.
- :mod:`torchtitan_ext.converter`: the ``"agoq"`` model converter, ``--experimental.custom_import
  torchtitan_ext.converter`` and ``[model] converters = ["agoq"]``.
- :mod:`torchtitan_ext.cpu_shims`: everything torchtitan needs to train on CPU with gloo, and
  a launcher (``python -m torchtitan_ext.cpu_shims <torchtitan args>``).
- :mod:`torchtitan_ext.assets`: a tiny tokenizer and text sample built from the Python
  stdlib's docstrings (torchtitan's wheel ships neither).
- ``debug_model.toml`` (llama3 debugmodel) and ``llama3_8b.toml``: sample configs.

See docs/torchtitan.md.
"""

TORCHTITAN_VERSION = "0.2.2"

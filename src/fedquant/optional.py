"""Optional dependencies: which extra of ``pip install fedquant[...]`` provides a module.

``pip install fedquant`` installs the codec and aggregation on NumPy and numba. The
simulator, the Flower adapter and Ray's simulation engine need extras; when one of
their modules is missing, :func:`install_hint` turns the ModuleNotFoundError into one line
naming the extra to install.
"""

from __future__ import annotations

#: top-level module -> the extra (pyproject.toml) whose install provides it
EXTRA_OF_MODULE: dict[str, str] = {
    "torch": "sim",
    "mlxtend": "sim",
    "PIL": "sim",
    "matplotlib": "sim",
    "rich": "sim",
    "flwr": "flower",
    "ray": "flower-sim",
}


def install_hint(error: ModuleNotFoundError) -> str | None:
    """The one-line remedy for a missing optional dependency.

    Parameters
    ----------
    error
        The ModuleNotFoundError raised while importing a module.

    Returns
    -------
    str or None
        ``"torch is not installed; install the sim extra: pip install 'fedquant[sim]'"``
        when a top-level module listed in :data:`EXTRA_OF_MODULE` is missing; None for
        any other module, or a missing submodule of an installed package (a missing core
        dependency or a bug, which the caller re-raises).
    """
    name = error.name or ""
    extra = EXTRA_OF_MODULE.get(name)
    if extra is None:
        return None
    return f"{name} is not installed; install the {extra} extra: pip install 'fedquant[{extra}]'"

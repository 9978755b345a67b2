"""Every method registers itself on import; :func:`make_method` builds one by name."""
from crosskv.methods.base import REGISTRY, MethodConfig, Runner, make_method, register
from crosskv.methods import full  # noqa: F401
from crosskv.methods import commonkv, compose  # noqa: F401
from crosskv.methods import kvsharer  # noqa: F401
from crosskv.methods import svd, minicache  # noqa: F401
from crosskv.methods import selective  # noqa: F401
from crosskv.methods import hybrid  # noqa: F401
from crosskv.methods import peers  # noqa: F401

__all__ = ["REGISTRY", "MethodConfig", "Runner", "make_method", "register"]

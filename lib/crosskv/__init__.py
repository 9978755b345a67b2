"""crosskv: cross-layer KV-cache compression (KVSharer, xKV, MiniCache, CommonKV), implemented and measured."""
from crosskv.models import load_model

__all__ = ["load_model"]
__version__ = "0.1.0"

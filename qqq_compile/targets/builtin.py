"""The targets this package ships: importing this module registers them.

Adding a target is a folder under ``qqq_compile/targets/`` and one import line here.
"""

from qqq_compile.targets.gguf import target as gguf  # noqa: F401 - registers "gguf"
from qqq_compile.targets.w4a8 import target as w4a8  # noqa: F401 - registers "w4a8"

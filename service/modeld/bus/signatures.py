"""D-Bus type signatures used as annotations on exported members.

dbus-next reads the *values* of annotations as D-Bus signatures, so exported methods are
annotated with these constants (``-> OBJECT_PATH``) rather than Python types.
"""

from typing import Final

STRING: Final = "s"
OBJECT_PATH: Final = "o"
BOOLEAN: Final = "b"
UINT32: Final = "u"
UINT64: Final = "t"
STRINGS: Final = "as"
OPTIONS: Final = "a{sv}"
MODEL_LIST: Final = "a(ssso)"
ENDPOINT_AND_LEASE: Final = "sh"
NAME_AND_PATH: Final = "so"
NAME_PATH_AND_REASON: Final = "sos"

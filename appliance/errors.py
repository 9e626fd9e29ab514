"""One exception tree. Every message names the object at fault (device, umbox, file, key)."""


class KalkiError(Exception):
    """Base of every error the appliance raises on purpose."""


class ConfigError(KalkiError, ValueError):
    """A parameter, profile or setting is invalid; the message names the culprit."""


class StoreError(KalkiError):
    """The state file is unreadable or unwritable, or a record or argument is invalid."""


class UnknownUmboxError(ConfigError):
    pass


class UnknownDeviceError(KalkiError, KeyError):
    def __str__(self):  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else "unknown device"


class DataplaneError(KalkiError):
    """The kernel refused or lost something: a map operation, an attach, an nft transaction."""


class LabError(KalkiError):
    pass

"""Reusable test material for plugin authors: contract suites and fixtures.

Import ``StoreContract`` (or ``BackendContract``) into your own test module, subclass it, and
provide a ``store_spec`` (``backend_env``) fixture; every test of the contract then runs against
your plugin.
"""

from .backend_contract import BackendContract, BackendEnv
from .store_contract import StoreContract, StoreSpec

__all__ = ["BackendContract", "BackendEnv", "StoreContract", "StoreSpec"]

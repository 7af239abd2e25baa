"""Reusable test material for plugin authors: contract suites and fixtures.

Import ``StoreContract`` into your own test module, subclass it, and provide a ``store_spec``
fixture; every test of the contract then runs against your store.
"""

from .store_contract import StoreContract, StoreSpec

__all__ = ["StoreContract", "StoreSpec"]

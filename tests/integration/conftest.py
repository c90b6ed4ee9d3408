"""Fixtures of the deploy tests (defined in deploy_support)."""

from tests.integration.deploy_support import demo_dir, host

__all__ = ["demo_dir", "host"]

# Sandbox GPU host (systemd-nspawn) and S3 endpoint (moto); see scripts/sandbox/.
# Included by the top-level Makefile. Needs root and the project venv (`make install`).
SANDBOX_SCRIPTS := scripts/sandbox
SANDBOX_UP_ARGS ?=

.PHONY: sandbox sandbox-down sandbox-rootfs

sandbox-rootfs:  ## build (once) and cache the sandbox host's root filesystem
	$(SANDBOX_SCRIPTS)/build-rootfs

sandbox: install  ## boot the sandbox host and S3 endpoint (no-op when up), demo model uploaded
	$(SANDBOX_SCRIPTS)/up $(SANDBOX_UP_ARGS)
	$(SANDBOX_SCRIPTS)/seed-demo-model

sandbox-down:  ## stop the sandbox and remove what it left on this machine
	$(SANDBOX_SCRIPTS)/down

"""The stream engine: every guarantee, protocol-neutral. See ARCHITECTURE.md."""

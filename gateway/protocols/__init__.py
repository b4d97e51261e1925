"""Protocol adapters of the engine: each translates one wire protocol, and only that."""

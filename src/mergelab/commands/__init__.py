"""L6 — subcommands of the CLI; each module defines ``register(app)`` and imports heavy libraries lazily."""

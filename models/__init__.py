"""The zoo's model files: one architecture each, torch and the standard library only.

Each file stands alone (copy it into any project). Installed, they are importable as
`zoo.models.<name>`; every one exposes `Config` (a dataclass) and `Model(config)`.
"""

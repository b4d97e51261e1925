"""The configuration: typed, frozen declarations (model), the YAML loader and its checks."""

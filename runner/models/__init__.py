"""Plain nn.Modules; configs point at them with ``_target_``."""

"""The ground floor: the one user-facing error type and small file helpers every floor uses."""

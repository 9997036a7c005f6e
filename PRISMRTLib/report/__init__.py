"""Human-facing outputs: figures and reports."""

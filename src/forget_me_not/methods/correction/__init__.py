"""Concept correction: a role word untangled from the identity it collapses onto."""

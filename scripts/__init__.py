"""Thin command-line front ends: argument parsing, then one call into the packages."""

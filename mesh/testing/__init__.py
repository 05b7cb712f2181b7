"""Fakes of mesh's real parts for fast unit tests (a fake connector...). Never imported by mesh itself.
They stand in for hosts in unit tests only; end-to-end tests use the real thing.
"""

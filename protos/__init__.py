"""The wire contracts (package pagedserve.v1) and their generated stubs."""

"""The ground floor: neutral values every other floor may import, importing nothing above it."""

from grpokit.cli import console

console()

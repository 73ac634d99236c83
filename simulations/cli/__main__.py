from fedpa.simulations.cli import app

app()

"""berthctl, berth's command-line client (main.py), its controller connection (client.py), and the local
dev cluster (dev/)."""

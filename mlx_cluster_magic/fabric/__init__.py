"""Head side: the machines and their cables. Hostfiles and placement, interfaces and routes,
macOS discovery, the doctor, links and the topology picture."""

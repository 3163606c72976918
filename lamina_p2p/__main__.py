from lamina_p2p.cli import main

main(prog_name="lamina-node")

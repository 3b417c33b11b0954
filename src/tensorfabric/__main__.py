from tensorfabric.cli import main

main()

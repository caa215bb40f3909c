from resstream.cli import main

main()

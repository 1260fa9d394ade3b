from saft.report.tables import main

main()
